"""``run_study``: the study's protocol on the user's data and model.

1. Read the ``train`` and ``test`` splits; sample ``queries`` test examples (seeded).
2. Load the base model (a HuggingFace causal LM, or the built-in TinyLM pretrained on the
   training text) and add fresh LoRA adapters (or the configuration of ``adapter``).
3. Control "before fine-tuning": every method on that model (TinyLM: at random
   initialisation).
4. Fine-tune the adapters with AdamW (or load the weights of ``adapter`` and skip this).
5. Every method on the fine-tuned model, for the queries and, as the second control, for the
   queries with another class's response.
6. Metrics (``acc``, ``cover``, ``auc`` exactly as :mod:`influence.evaluation`) against class
   membership, and the outputs (:mod:`influence.study.outputs`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..demo.metrics import chance
from ..demo.pipeline import finetune_epoch, mean_token_loss
from ..tasks import LanguageModelingTask
from .attribution import StudyAttribution, run_methods
from .batches import make_batches, token_lengths
from .config import StudyConfig
from .controls import swap_responses
from .data import Record, check_classes, read_split
from .lora import add_lora, fresh_from_adapter, load_adapter_weights
from .models import load_hf, random_tinylm, tinylm_base


@dataclass
class StudyResult:
    """What :func:`run_study` returns.

    Attributes:
        results: everything ``results.json`` holds (metrics, chance levels, timings, config).
        scores: ``{method: (n_queries, n_train)}`` scores on the fine-tuned model, positive =
            helpful.
        control_scores: ``{control: {method: (n_queries, n_train)}}``.
        train, queries, swapped_queries: the examples, in score order.
        model, tokenizer: the fine-tuned (or loaded) LoRA model and its tokenizer.
        out: the output folder, when one was written.
    """

    results: dict
    scores: dict[str, np.ndarray]
    control_scores: dict[str, dict[str, np.ndarray]]
    train: list[Record]
    queries: list[Record]
    swapped_queries: list[Record]
    model: torch.nn.Module | None = None
    tokenizer: object = None
    out: Path | None = field(default=None)

    def top_examples(self, method: str, k: int = 5) -> list[dict]:
        """Per query, its ``k`` highest-scoring training examples (text, label, score)."""
        if method not in self.scores:
            raise KeyError(f"No scores for method {method!r}; the run has {sorted(self.scores)}.")
        S = self.scores[method]
        k = min(k, S.shape[1])
        out = []
        for query, row in zip(self.queries, S):
            top = np.argsort(-row, kind="stable")[:k]
            out.append({"method": method, "query": query.to_dict(), "top": [
                {"rank": r + 1, "score": float(row[j]), **self.train[j].to_dict()}
                for r, j in enumerate(top)]})
        return out


def _sample(test: list[Record], n: int | None, seed: int) -> list[Record]:
    if n is None or n >= len(test):
        return list(test)
    chosen = sorted(random.Random(seed).sample(range(len(test)), n))
    return [test[i] for i in chosen]


def _numpy(by_method: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {m: S.double().numpy() for m, S in by_method.items()}


def run_study(config: StudyConfig, progress: bool = False,
              log: Callable[[str], None] = print) -> StudyResult:
    """Runs the study (see the module docstring); writes ``config.out`` unless it is ``None``.

    Examples:
        See ``docs/study.md``; from the command line: ``influence study --data DIR``.
    """
    from tqdm.auto import tqdm

    from .outputs import write_outputs

    config.checked()
    start = time.perf_counter()
    train = read_split(config.data, "train", config.fields)
    test = read_split(config.data, "test", config.fields)
    classes = check_classes(train, test)
    queries = _sample(test, config.queries, config.seed)
    swapped, donor_labels = swap_responses(queries, train, config.seed)
    class_id = {c: i for i, c in enumerate(classes)}
    train_ids = [class_id[r.label] for r in train]
    query_ids = [class_id[r.label] for r in queries]
    log(f"data: {len(train)} training examples, {len(queries)} of {len(test)} test examples as "
        f"queries, {len(classes)} classes")

    if config.model:
        base, tokenizer = load_hf(config.model, config.dtype, config.device, progress)
        model_info = {"kind": "huggingface", "name": config.model}
    else:
        base, tokenizer, model_info = tinylm_base(train, config.pretrain, config.device, config.dtype,
                                                  progress, (*queries, *swapped), config.max_length)
    model_info["num_params"] = sum(p.numel() for p in base.parameters())
    timings = {"load": time.perf_counter() - start}

    def batches(records):
        loss = make_batches(tokenizer, records, config.batch_size, config.loss, config.max_length,
                            config.device)
        if config.loss == "response":
            return loss, loss
        return loss, make_batches(tokenizer, records, config.batch_size, "response",
                                  config.max_length, config.device)

    train_set, query_set, swapped_set = batches(train), batches(queries), batches(swapped)
    attribute = {"damping_ratio": config.damping_ratio, "curvature_type": config.curvature_type}
    if config.adapter:
        model = fresh_from_adapter(base, config.adapter, config.seed)
    else:
        model = add_lora(base, config.lora, config.seed)
    model_info["lora_modules"] = sorted({n.split(".lora_")[0] for n, p in model.named_parameters()
                                         if "lora_" in n})
    controls: dict[str, dict] = {}
    control_scores: dict[str, dict[str, np.ndarray]] = {}
    clock = time.perf_counter()
    if config.controls:
        before = model if config.model else add_lora(
            random_tinylm(model_info, config.seed, config.device, config.dtype), config.lora, config.seed)
        attribution = StudyAttribution(before, train_set, {"before_finetuning": query_set}, **attribute)
        res, sc = run_methods(attribution, config.methods, train_ids, {"before_finetuning": query_ids},
                              log, progress, desc="control: before fine-tuning")
        controls.update(res)
        control_scores["before_finetuning"] = _numpy(sc["before_finetuning"])
        del attribution, before
    timings["control_before_finetuning"] = time.perf_counter() - clock
    clock = time.perf_counter()

    task = LanguageModelingTask()
    history = []
    if config.adapter:
        load_adapter_weights(model, config.adapter)
    else:
        adapters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(adapters, lr=config.learning_rate, weight_decay=0.0)
        rng = random.Random(config.seed)
        torch.manual_seed(config.seed)  # the same dropout draws with and without the controls
        for epoch in tqdm(range(1, config.epochs + 1), desc="fine-tune", disable=not progress,
                          leave=False):
            train_loss = finetune_epoch(model, train_set[0], optimizer, task, rng)
            history.append({"epoch": epoch, "train_loss": train_loss,
                            "query_loss": mean_token_loss(model, query_set[0], task)})
            log(f"epoch {epoch}: train loss {train_loss:.4f}, query loss {history[-1]['query_loss']:.4f}")
    model.eval()
    timings["finetune"] = time.perf_counter() - clock
    clock = time.perf_counter()

    query_sets = {"finetuned": query_set}
    if config.controls:
        query_sets["swapped_response"] = swapped_set
    attribution = StudyAttribution(model, train_set, query_sets, **attribute)
    ids = {"finetuned": query_ids, "swapped_response": [class_id[r.label] for r in swapped]}
    res, sc = run_methods(attribution, config.methods, train_ids, ids, log, progress,
                          extra_ids={"swapped_response": [class_id[d] for d in donor_labels]})
    if config.controls:
        controls["swapped_response"] = res["swapped_response"]
        control_scores["swapped_response"] = _numpy(sc["swapped_response"])
    model_info["num_lora_params"] = attribution.num_params
    timings["attribution"] = time.perf_counter() - clock

    results = {
        "config": config.to_dict(),
        "model": model_info,
        "data": {"n_train": len(train), "n_test": len(test), "n_queries": len(queries),
                 "query_indices": [r.index for r in queries], "classes": classes,
                 "train_class_counts": dict(Counter(r.label for r in train)),
                 "train_lengths": token_lengths(train_set[0])},
        "chance": {"acc": chance(train_ids, query_ids), "cover": chance(train_ids, query_ids),
                   "auc": 0.5},
        "damping": attribution.damping,
        "finetune": {"skipped": bool(config.adapter), "lr": None if config.adapter else config.learning_rate,
                     "epochs": history},
        "methods": res["finetuned"],
        "controls": controls,
        "timings": timings,
        "seconds": None,
    }
    result = StudyResult(results, _numpy(sc["finetuned"]), control_scores, train, queries, swapped,
                         model, tokenizer)
    results["seconds"] = time.perf_counter() - start
    if config.out:
        result.out = write_outputs(result, config.out, save_adapter=bool(config.model and not config.adapter))
    return result
