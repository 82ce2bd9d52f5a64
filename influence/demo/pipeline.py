"""The study's protocol on one task: LoRA fine-tuning, then attribution by every method.

For each task: copy the pretrained base model, add LoRA (r = 4, alpha = 32, dropout 0.1 on
the attention query and value projections of every layer), fine-tune with AdamW on the loss
of the response tokens, then score every (query, training example) pair with each method on
the LoRA parameters and compute ``acc``, ``cover`` and ``auc`` against class membership.
Two analyses of the study come along: the iHVP error of each curvature against ``exact``
(relative error and cosine of the preconditioned query gradients), and attribution quality
at intermediate fine-tuning epochs.

Damping is relative, ``λ = damping_ratio · mean_j ‖∇ℓ(z_j)‖² / P`` (a fraction of the mean
eigenvalue of the empirical Fisher), and shared by all curvature methods of a task.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..estimator import InfluenceEstimator
from ..gradients import per_sample_grads
from ..lm import LORA_PARAMS, apply_lora, apply_peft_lora
from ..params import select_parameters
from ..tasks import LanguageModelingTask
from .data import make_batches
from .families import FAMILIES, TaskData, make_task
from .methods import METHODS, check_methods, repsim_scores
from .metrics import chance, class_metrics
from .pretrain import PretrainConfig, pretrain


@dataclass
class DemoConfig:
    """Everything a demo run depends on (written into the report)."""

    tasks: tuple[str, ...] = tuple(FAMILIES)
    methods: tuple[str, ...] = tuple(METHODS)
    scale: float = 0.2
    n_queries: int = 20
    epochs: int = 8
    checkpoints: tuple[int, ...] = (1, 2, 4)
    epoch_methods: tuple[str, ...] = ("identity", "repsim")
    lr: float = 1e-2
    batch_size: int = 16
    lora_r: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("*.q", "*.v")
    lora_backend: str = "builtin"
    damping_ratio: float = 0.1
    damping_sweep: tuple[float, ...] = (1.0, 10.0, 100.0)
    curvature_type: str = "fisher"
    seed: int = 0
    device: str = "cpu"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)


LORA_BACKENDS = {"builtin": apply_lora, "peft": apply_peft_lora}


def add_lora(model: torch.nn.Module, config: DemoConfig) -> torch.nn.Module:
    """The study's adapters via the built-in wrapper or, with ``lora_backend="peft"``, peft."""
    if config.lora_backend not in LORA_BACKENDS:
        raise ValueError(
            f"Invalid lora_backend {config.lora_backend!r}. Supported: {tuple(LORA_BACKENDS)}."
        )
    return LORA_BACKENDS[config.lora_backend](
        model, config.lora_targets, config.lora_r, config.lora_alpha, config.lora_dropout
    )


def finetune_epoch(model, batches, optimizer, task, rng: random.Random) -> float:
    """One epoch of AdamW over shuffled batches; returns the mean per-token training loss."""
    model.train()
    order = list(range(len(batches)))
    rng.shuffle(order)
    total, tokens = 0.0, 0
    for i in order:
        batch = batches[i]
        n_tok = int((batch["labels"][:, 1:] != -100).sum())
        loss = task.loss(model, batch).sum()
        optimizer.zero_grad(set_to_none=True)
        (loss / n_tok).backward()
        optimizer.step()
        total, tokens = total + loss.item(), tokens + n_tok
    model.eval()
    return total / tokens


@torch.no_grad()
def mean_token_loss(model, batches, task) -> float:
    model.eval()
    total = sum(task.loss(model, b).sum().item() for b in batches)
    return total / sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def to_device(batches: list[dict], device: str) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def relative_damping(G: torch.Tensor, ratio: float) -> float:
    """``ratio · mean ‖g‖² / P``: a fraction of the empirical Fisher's mean eigenvalue."""
    return float(ratio * G.double().pow(2).sum(1).mean() / G.shape[1])


class Attribution:
    """Scores of one fine-tuned model by any registered method (gradients computed once)."""

    def __init__(self, model, data: TaskData, train_batches, test_batches, config: DemoConfig):
        self.model, self.data, self.config = model.eval(), data, config
        self.train_batches, self.test_batches = train_batches, test_batches
        self.task = LanguageModelingTask()
        self.layout = select_parameters(model, LORA_PARAMS)
        self.G_train = torch.cat([per_sample_grads(model, self.task, b, self.layout) for b in train_batches])
        self.damping = relative_damping(self.G_train, config.damping_ratio)
        self.factors: dict[str, torch.Tensor] = {}
        self.estimators: dict[str, InfluenceEstimator] = {}

    def scores(self, name: str) -> tuple[torch.Tensor, dict]:
        method = METHODS[name]
        if method.kind == "repsim":
            scores, impl = repsim_scores(self.model, self.train_batches, self.test_batches)
            return scores, {"implementation": impl}
        curvature = method.build(self.damping, self.config.curvature_type)
        est = InfluenceEstimator(curvature, self.task, params=self.layout)
        est.fit(self.model, self.train_batches)
        factors = est.influence_factors(self.test_batches).double()
        self.factors[name] = factors
        self.estimators[name] = est
        return factors @ self.G_train.double().T, {"curvature": repr(curvature)}

    def damping_sweep(self, name: str, ratios: Sequence[float]) -> dict[str, dict]:
        """Metrics of a fitted method at other damping ratios (no refit: damping is solve-time)."""
        if name not in self.estimators:
            return {}
        curvature = self.estimators[name].curvature_
        G_test = torch.cat([per_sample_grads(self.model, self.task, b, self.layout,
                                             objective="measurement") for b in self.test_batches])
        train_y = [ex.label for ex in self.data.train]
        test_y = [ex.label for ex in self.data.test]
        out = {}
        for ratio in ratios:
            damping = relative_damping(self.G_train, ratio)
            scores = curvature.solve(G_test, damping=damping).double() @ self.G_train.double().T
            out[f"{ratio:g}"] = {"damping": damping, **class_metrics(scores.cpu(), train_y, test_y)}
        return out

    def ihvp_errors(self, reference: str = "exact") -> dict[str, dict[str, float]]:
        """Per method: mean relative error ``‖x − x*‖/‖x*‖`` and mean cosine to ``exact``."""
        if reference not in self.factors:
            return {}
        ref = self.factors[reference]
        out = {}
        for name, X in self.factors.items():
            if name == reference:
                continue
            rel = ((X - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).mean()
            cos = torch.nn.functional.cosine_similarity(X, ref, dim=1).mean()
            out[name] = {"relative_error": float(rel), "cosine": float(cos)}
        return out


def evaluate(attribution: Attribution, names: Sequence[str], log: Callable[[str], None]) -> dict:
    """Runs each method; returns ``{name: {acc, cover, auc, seconds, ...}}``."""
    data = attribution.data
    train_y = [ex.label for ex in data.train]
    test_y = [ex.label for ex in data.test]
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            scores, info = attribution.scores(name)
        except Exception as error:  # report and go on with the other methods
            results[name] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:400]}
            log(f"  {name}: failed ({results[name]['reason']})")
            continue
        results[name] = {"status": "ok", **class_metrics(scores.cpu(), train_y, test_y),
                         "seconds": time.perf_counter() - start, **info}
    return results


def run_task(
    name: str,
    base_model: torch.nn.Module,
    tokenizer,
    config: DemoConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tunes a LoRA copy of ``base_model`` on one task and evaluates every method."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    methods = check_methods(config.methods)
    data = make_task(name, config.scale, config.n_queries, config.seed)
    train_batches = to_device(make_batches(tokenizer, data.train, config.batch_size), config.device)
    test_batches = to_device(make_batches(tokenizer, data.test, config.batch_size), config.device)
    train_y = [ex.label for ex in data.train]
    test_y = [ex.label for ex in data.test]
    torch.manual_seed(config.seed)
    model = add_lora(copy.deepcopy(base_model), config)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=config.lr, weight_decay=0.0)
    task = LanguageModelingTask()
    rng = random.Random(config.seed)
    history = []
    epoch_methods = [m for m in config.epoch_methods if m in METHODS]
    for epoch in tqdm(range(1, config.epochs + 1), desc=f"{name}: fine-tune", disable=not progress,
                      leave=False):
        train_loss = finetune_epoch(model, train_batches, optimizer, task, rng)
        row = {"epoch": epoch, "train_loss": train_loss,
               "query_loss": mean_token_loss(model, test_batches, task)}
        if epoch in config.checkpoints and epoch != config.epochs:
            attribution = Attribution(model, data, train_batches, test_batches, config)
            row["methods"] = evaluate(attribution, epoch_methods, log)
        history.append(row)
    attribution = Attribution(model, data, train_batches, test_batches, config)
    finals = {}
    for m in tqdm(methods, desc=f"{name}: attribute", disable=not progress, leave=False):
        finals.update(evaluate(attribution, [m], log))
    history[-1]["methods"] = {m: finals[m] for m in epoch_methods if m in finals}
    return {
        "task": name,
        "n_train": len(data.train),
        "n_test": len(data.test),
        "classes": list(data.class_names),
        "chance": chance(train_y, test_y),
        "num_lora_params": attribution.layout.num_params,
        "damping": attribution.damping,
        "methods": finals,
        "ihvp_error": attribution.ihvp_errors(),
        "exact_damping_sweep": attribution.damping_sweep("exact", config.damping_sweep),
        "epochs": history,
        "seconds": time.perf_counter() - start,
    }


def run_demo(
    config: DemoConfig | None = None,
    cache_dir=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Pretrains (or loads) the base model, then runs every task of ``config``."""
    config = config or DemoConfig()
    unknown = [t for t in config.tasks if t not in FAMILIES]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}. Supported: {tuple(FAMILIES)}.")
    check_methods(config.methods)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    base, tok, info = pretrain(config.pretrain, cache_dir, config.device, progress)
    log(f"base model: {info['num_params']:,} parameters, "
        + ("loaded from cache" if info["cached"] else f"pretrained in {info['seconds']:.0f} s")
        + f" ({info['cache']})")
    tasks = []
    for name in config.tasks:
        result = run_task(name, base, tok, config, progress, log)
        log(f"{name}: {result['n_train']} train / {result['n_test']} queries, "
            f"{result['seconds']:.0f} s")
        tasks.append(result)
    return {"config": config.to_dict(), "pretrain": info, "tasks": tasks,
            "seconds": time.perf_counter() - start}
