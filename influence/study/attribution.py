"""Scores of one model by the demo's methods, for several sets of queries at once.

The methods are the demo's registry (:data:`influence.demo.methods.METHODS`), computed as the
demo computes them (:class:`influence.demo.attribution.Attribution`): influence functions on the
LoRA parameters, ``score[i, j] = ∇m(query_i)ᵀ (C + λI)⁻¹ ∇ℓ(train_j)`` (positive = helpful)
with the relative damping ``λ = damping_ratio · mean_j ‖∇ℓ(train_j)‖² / P``, and RepSim (cosine
of the final hidden states at the last prompt token). A curvature is fitted once per model and
reused for every query set (the controls' swapped queries cost one more gradient pass).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch

from .. import evaluation
from ..demo.methods import METHODS, repsim_scores
from ..demo.metrics import class_metrics
from ..demo.attribution import Attribution

QuerySet = tuple[list[dict], list[dict]]
"""``(loss_batches, response_batches)`` of one set of queries: the batches of the chosen
training loss, and the response-labelled batches RepSim reads its last prompt token from."""


class StudyAttribution:
    """Per-method score matrices of ``model`` for named query sets.

    Args:
        model: the (LoRA) model to attribute, in eval mode.
        train: the training set's :data:`QuerySet`.
        damping_ratio: ``λ = damping_ratio · mean ‖∇ℓ‖² / P``.
        curvature_type: the curvature of the curvature methods (``"fisher"``, ``"ggn"``, ...).
    """

    def __init__(self, model, train: QuerySet, queries: Mapping[str, QuerySet],
                 damping_ratio: float = 0.1, curvature_type: str = "fisher"):
        self.model, self.train, self.queries = model.eval(), train, dict(queries)
        main = next(iter(self.queries.values()))
        self.attribution = Attribution(model, train[0], main[0], damping_ratio=damping_ratio,
                                       curvature_type=curvature_type)

    @property
    def damping(self) -> float:
        return self.attribution.damping

    @property
    def num_params(self) -> int:
        return self.attribution.layout.num_params

    def scores(self, name: str) -> dict[str, torch.Tensor]:
        """``{query set: (n_queries, n_train) float64 scores}`` of method ``name``."""
        if METHODS[name].kind == "repsim":
            return {key: repsim_scores(self.model, self.train[1], rep)[0].cpu()
                    for key, (_, rep) in self.queries.items()}
        keys = list(self.queries)
        main, _ = self.attribution.scores(name)
        out = {keys[0]: main.cpu()}
        for key in keys[1:]:  # the fitted method, no refit
            out[key] = self.attribution.query_scores(name, self.queries[key][0]).cpu()
        return out


def metrics(scores: torch.Tensor, train_ids: Sequence[int], query_ids: Sequence[int]) -> dict:
    """``{"acc", "cover", "auc"}`` exactly as :mod:`influence.evaluation` defines them."""
    return class_metrics(scores, list(train_ids), list(query_ids))


def run_methods(attribution: StudyAttribution, names: Sequence[str], train_ids: Sequence[int],
                query_ids: Mapping[str, Sequence[int]], log: Callable[[str], None],
                progress: bool = False, extra_ids: Mapping[str, Sequence[int]] | None = None,
                desc: str = "attribute") -> tuple[dict, dict]:
    """Runs each method on every query set of ``attribution``.

    Returns ``(results, scores)``: ``results[set][method]`` holds ``status`` and, when ``ok``,
    ``acc``, ``cover``, ``auc`` and ``seconds`` (the time of the method on that set; the first
    set's includes the fit); ``scores[set][method]`` the ``(n_queries, n_train)`` matrix. A
    method that fails is reported (``status: failed`` and the reason) and the others go on.
    ``extra_ids[set]`` adds ``acc_other_class``: the Acc against those labels instead.
    """
    from tqdm.auto import tqdm

    results = {key: {} for key in attribution.queries}
    scores = {key: {} for key in attribution.queries}
    for name in tqdm(names, desc=desc, disable=not progress, leave=False):
        start = time.perf_counter()
        try:
            by_set = attribution.scores(name)
        except Exception as error:  # report and go on with the other methods
            reason = f"{type(error).__name__}: {error}"[:400]
            for key in results:
                results[key][name] = {"status": "failed", "reason": reason}
            log(f"  {name}: failed ({reason})")
            continue
        seconds = time.perf_counter() - start
        for key, S in by_set.items():
            entry = {"status": "ok", **metrics(S, train_ids, query_ids[key])}
            if extra_ids and key in extra_ids:
                entry["acc_other_class"] = float(
                    evaluation.top1_accuracy(S, list(train_ids), list(extra_ids[key])))
            results[key][name] = {**entry, "seconds": seconds if key == next(iter(by_set)) else None}
            scores[key][name] = S
    return results, scores
