"""The study's protocol on one task: LoRA fine-tuning, then attribution by every method.

For each task: copy the pretrained base model, add LoRA (r = 4, alpha = 32, dropout 0.1 on
the attention query and value projections of every layer), fine-tune with AdamW on the loss
of the response tokens, then score every (query, training example) pair with each method on
the LoRA parameters and compute ``acc``, ``cover`` and ``auc`` against class membership.
Two analyses of the study come along: the iHVP error of each curvature against ``exact``
(relative error and cosine of the preconditioned query gradients), and attribution quality
at intermediate fine-tuning epochs. Two controls (:mod:`influence.demo.controls`) run the same
methods on the model before fine-tuning and on queries with another class's response.

Damping is relative (:func:`~influence.demo.attribution.relative_damping`) and shared by all
curvature methods of a task. :func:`run_task` returns a :class:`TaskResult`: the summary that
goes into ``results.json`` plus the score matrices, the fine-tuned model and the examples.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..estimator import InfluenceEstimator
from ..lm import apply_lora, apply_peft_lora
from ..tasks import LanguageModelingTask
from . import attribution as _attribution
from .attribution import evaluate
from .controls import CONTROL_INITS, run_controls, swap_responses, untrained_model
from .data import Example, make_batches
from .families import FAMILIES, TaskData, make_task
from .methods import METHODS, check_methods
from .metrics import chance
from .pretrain import PretrainConfig, pretrain
from .tokenizer import DemoTokenizer


@dataclass
class DemoConfig:
    """Everything a demo run depends on (written into the report).

    ``controls`` adds the two control rows (:mod:`influence.demo.controls`) for
    ``control_methods`` (those of them that the run has; ``None``: every method of the run; by
    default every registered method but ``lissa``, whose 200-step solves would double the run's
    time): the model before fine-tuning
    (``control_init``: ``"random"``, a freshly initialised TinyLM, or ``"base"``, the pretrained
    base model; adapters at their initialisation) and queries with another class's response.
    """

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
    controls: bool = True
    control_init: str = "random"
    control_methods: tuple[str, ...] | None = tuple(m for m in METHODS if m != "lissa")
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


class Attribution(_attribution.Attribution):
    """:class:`influence.demo.attribution.Attribution` with the older signature
    ``Attribution(model, data, train_batches, test_batches, config)`` (``data`` unused; damping
    ratio and curvature type from ``config``), kept for existing callers."""

    def __init__(self, model, data, train_batches, test_batches, config: DemoConfig):
        super().__init__(model, train_batches, test_batches, damping_ratio=config.damping_ratio,
                         curvature_type=config.curvature_type)


@dataclass
class TaskResult:
    """What :func:`run_task` returns: the summary and everything behind it.

    Attributes:
        summary: the JSON-ready results of the task (what ``results.json`` holds for it).
        data: the examples: ``data.train`` (score columns) and ``data.test`` (score rows).
        model: the fine-tuned model (eval mode; LoRA on the pretrained base).
        tokenizer: the tokenizer of ``model``.
        scores: per method, the ``(n_test, n_train)`` float64 scores (positive = helpful).
        estimators: per influence method, the fitted :class:`~influence.InfluenceEstimator`
            (for :func:`influence.diagnose`).
        train_batches, test_batches: the batches the scores were computed from.
        swapped: the swapped-response control queries (empty without controls).
        control_scores: ``{control: {method: scores}}`` of the two controls.
    """

    summary: dict
    data: TaskData
    model: torch.nn.Module
    tokenizer: DemoTokenizer
    scores: dict[str, torch.Tensor]
    estimators: dict[str, InfluenceEstimator]
    train_batches: list[dict]
    test_batches: list[dict]
    swapped: list[Example] = field(default_factory=list)
    control_scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def top_examples(self, method: str, query: int, k: int = 5) -> list[tuple[int, float, Example]]:
        """The ``k`` most helpful training examples of query ``query``: ``(index, score, example)``,
        highest score first."""
        if method not in self.scores:
            raise KeyError(f"No scores for method {method!r}; this run has {sorted(self.scores)}.")
        row = self.scores[method][query]
        top = torch.topk(row, min(k, row.numel()))
        return [(int(j), float(v), self.data.train[int(j)]) for v, j in zip(top.values, top.indices)]


def run_task(
    name: str,
    base_model: torch.nn.Module,
    tokenizer: DemoTokenizer,
    config: DemoConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TaskResult:
    """Fine-tunes a LoRA copy of ``base_model`` on one task, evaluates every method and the
    controls; ``base_model`` is left unchanged."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    methods = check_methods(config.methods)
    if config.control_init not in CONTROL_INITS:
        raise ValueError(f"Invalid control_init {config.control_init!r}. Supported: {CONTROL_INITS}.")
    data = make_task(name, config.scale, config.n_queries, config.seed)
    train_batches = to_device(make_batches(tokenizer, data.train, config.batch_size), config.device)
    test_batches = to_device(make_batches(tokenizer, data.test, config.batch_size), config.device)
    train_y = [ex.label for ex in data.train]
    test_y = [ex.label for ex in data.test]
    attribute = dict(damping_ratio=config.damping_ratio, curvature_type=config.curvature_type)
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
            checkpoint = _attribution.Attribution(model, train_batches, test_batches, **attribute)
            row["methods"] = evaluate(checkpoint, epoch_methods, train_y, test_y, log)[0]
        history.append(row)
    attribution = _attribution.Attribution(model, train_batches, test_batches, **attribute)
    finals, scores = {}, {}
    for m in tqdm(methods, desc=f"{name}: attribute", disable=not progress, leave=False):
        out, S = evaluate(attribution, [m], train_y, test_y, log)
        finals.update(out)
        scores.update(S)
    history[-1]["methods"] = {m: finals[m] for m in epoch_methods if m in finals}
    summary = {
        "task": name,
        "n_train": len(data.train),
        "n_test": len(data.test),
        "classes": list(data.class_names),
        "chance": chance(train_y, test_y),
        "num_lora_params": attribution.layout.num_params,
        "damping": attribution.damping,
        "methods": finals,
        "ihvp_error": attribution.ihvp_errors(),
        "exact_damping_sweep": attribution.damping_sweep("exact", config.damping_sweep, train_y, test_y),
        "epochs": history,
    }
    result = TaskResult(summary, data, model, tokenizer, scores, dict(attribution.estimators),
                        train_batches, test_batches)
    if config.controls:
        _controls(result, attribution, base_model, config, train_y, test_y, log)
    summary["seconds"] = time.perf_counter() - start
    return result


def _controls(result: TaskResult, attribution: _attribution.Attribution, base_model,
              config: DemoConfig, train_y, test_y, log) -> None:
    """Adds both controls to ``result`` for the control methods that succeeded."""
    wanted = config.methods if config.control_methods is None else config.control_methods
    names = [m for m in check_methods(wanted) if m in config.methods
             and result.summary["methods"].get(m, {}).get("status") == "ok"]
    result.swapped = swap_responses(result.data.test, result.data.train, config.seed)
    swapped_batches = to_device(make_batches(result.tokenizer, result.swapped, config.batch_size),
                                config.device)
    before_model = untrained_model(base_model, lambda m: add_lora(m, config), config.control_init,
                                   config.seed)
    before = _attribution.Attribution(before_model, result.train_batches, result.test_batches,
                         damping_ratio=config.damping_ratio, curvature_type=config.curvature_type)
    out, result.control_scores = run_controls(attribution, before, swapped_batches, result.swapped,
                                              names, train_y, test_y, log)
    result.summary["controls"] = {"init": config.control_init, **out}


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
    check_methods(config.control_methods or ())
    if config.control_init not in CONTROL_INITS:
        raise ValueError(f"Invalid control_init {config.control_init!r}. Supported: {CONTROL_INITS}.")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    base, tok, info = pretrain(config.pretrain, cache_dir, config.device, progress)
    log(f"base model: {info['num_params']:,} parameters, "
        + ("loaded from cache" if info["cached"] else f"pretrained in {info['seconds']:.0f} s")
        + f" ({info['cache']})")
    tasks = []
    for name in config.tasks:
        result = run_task(name, base, tok, config, progress, log).summary
        log(f"{name}: {result['n_train']} train / {result['n_test']} queries, "
            f"{result['seconds']:.0f} s")
        tasks.append(result)
    return {"config": config.to_dict(), "pretrain": info, "tasks": tasks,
            "seconds": time.perf_counter() - start}
