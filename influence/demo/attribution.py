"""Attribution of one model by a list of registered methods, with class metrics.

:class:`Attribution` works on any (model, training batches, query batches): the demo's
fine-tuned TinyLM, the same model before fine-tuning (a control), or a HuggingFace / peft
model, as long as the batches are what the ``task`` reads (by default
:class:`~influence.LanguageModelingTask`'s dict batches) and ``params`` selects the attributed
parameters (by default the LoRA adapters). Training gradients are computed once and shared by
every method; a fitted method also scores new queries without refitting
(:meth:`Attribution.query_scores`, used by the swapped-response control).

Damping is relative, ``λ = damping_ratio · mean_j ‖∇ℓ(z_j)‖² / P`` (a fraction of the mean
eigenvalue of the empirical Fisher), and shared by all curvature methods of one attribution.
Usage (``docs/demo.md``, "Using the pieces")::

    att = Attribution(model, train_batches, query_batches)
    results, scores = evaluate(att, ["identity", "repsim"], train_labels, query_labels)
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from ..estimator import InfluenceEstimator
from ..gradients import per_sample_grads
from ..lm import LORA_PARAMS
from ..params import select_parameters
from ..tasks import LanguageModelingTask
from .methods import METHODS, check_methods, make_repsim
from .metrics import class_metrics


def relative_damping(G: torch.Tensor, ratio: float) -> float:
    """``ratio · mean ‖g‖² / P``: a fraction of the empirical Fisher's mean eigenvalue."""
    return float(ratio * G.double().pow(2).sum(1).mean() / G.shape[1])


class Attribution:
    """Scores of one model by any registered method (training gradients computed once).

    Args:
        model: the model to attribute (put in eval mode).
        train_batches: the training set, a list of batches in a fixed order (score columns).
        test_batches: the queries (score rows).
        damping_ratio: the relative damping shared by every curvature method.
        curvature_type: the curvature of methods that take one (``"fisher"``, ``"ggn"``, ...).
        params: the attributed parameters (any ``params`` of :class:`~influence.InfluenceEstimator`).
        task: how a batch becomes per-example losses; default
            :class:`~influence.LanguageModelingTask`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_batches: Sequence[Any],
        test_batches: Sequence[Any],
        damping_ratio: float = 0.1,
        curvature_type: str = "fisher",
        params: Any = LORA_PARAMS,
        task: Any = None,
    ):
        self.model = model.eval()
        self.train_batches, self.test_batches = list(train_batches), list(test_batches)
        self.curvature_type = curvature_type
        self.task = task or LanguageModelingTask()
        self.layout = select_parameters(model, params)
        self.G_train = torch.cat([per_sample_grads(model, self.task, b, self.layout)
                                  for b in self.train_batches])
        self.damping = relative_damping(self.G_train, damping_ratio)
        self.factors: dict[str, torch.Tensor] = {}
        self.estimators: dict[str, InfluenceEstimator] = {}
        self.repsim: Any = None

    def scores(self, name: str) -> tuple[torch.Tensor, dict]:
        """``(n_test, n_train)`` float64 scores of one method (fitting it) and a description."""
        method = METHODS[name]
        if method.kind == "repsim":
            self.repsim = make_repsim().fit(self.model, self.train_batches)
            return self.query_scores(name, self.test_batches), {
                "implementation": "influence.RepresentationSimilarity"}
        curvature = method.build(self.damping, self.curvature_type)
        est = InfluenceEstimator(curvature, self.task, params=self.layout)
        est.fit(self.model, self.train_batches)
        self.estimators[name] = est
        factors = est.influence_factors(self.test_batches).double()
        self.factors[name] = factors
        return factors @ self.G_train.double().T, {"curvature": repr(curvature)}

    def fitted(self, name: str) -> bool:
        """Whether :meth:`scores` has fitted ``name`` (so :meth:`query_scores` can use it)."""
        return self.repsim is not None if METHODS[name].kind == "repsim" else name in self.estimators

    def query_scores(self, name: str, batches: Sequence[Any]) -> torch.Tensor:
        """Scores of other queries by a method :meth:`scores` already fitted (no refit)."""
        if not self.fitted(name):
            raise RuntimeError(f"Call scores({name!r}) before query_scores({name!r}, ...).")
        if METHODS[name].kind == "repsim":
            return torch.as_tensor(self.repsim.pairwise_scores(list(batches))).double()
        factors = self.estimators[name].influence_factors(list(batches)).double()
        return factors @ self.G_train.double().T

    def damping_sweep(self, name: str, ratios: Sequence[float], train_labels, test_labels
                      ) -> dict[str, dict]:
        """Metrics of a fitted method at other damping ratios (no refit: damping is solve-time)."""
        if name not in self.estimators:
            return {}
        curvature = self.estimators[name].curvature_
        G_test = torch.cat([per_sample_grads(self.model, self.task, b, self.layout,
                                             objective="measurement") for b in self.test_batches])
        out = {}
        for ratio in ratios:
            damping = relative_damping(self.G_train, ratio)
            scores = curvature.solve(G_test, damping=damping).double() @ self.G_train.double().T
            out[f"{ratio:g}"] = {"damping": damping,
                                 **class_metrics(scores.cpu(), train_labels, test_labels)}
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


def _failed(error: Exception) -> dict:
    return {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:400]}


def evaluate(
    attribution: Attribution,
    names: Sequence[str],
    train_labels: Sequence,
    test_labels: Sequence,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Runs each method; returns ``({name: {status, acc, cover, auc, seconds, ...}},
    {name: scores (n_test, n_train)})``. A method that raises is reported as failed (with
    its error) and the others still run."""
    results, scores = {}, {}
    for name in check_methods(names):
        start = time.perf_counter()
        try:
            S, info = attribution.scores(name)
        except Exception as error:  # report and go on with the other methods
            results[name] = _failed(error)
            log(f"  {name}: failed ({results[name]['reason']})")
            continue
        scores[name] = S.cpu()
        results[name] = {"status": "ok", **class_metrics(scores[name], train_labels, test_labels),
                         "seconds": time.perf_counter() - start, **info}
    return results, scores


def evaluate_queries(
    attribution: Attribution,
    names: Sequence[str],
    batches: Sequence[Any],
    train_labels: Sequence,
    labels: Sequence,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Like :func:`evaluate` for other queries (``batches`` with their ``labels``), scored by
    the methods :func:`evaluate` already fitted on ``attribution``; others are skipped."""
    results, scores = {}, {}
    for name in names:
        if not attribution.fitted(name):
            continue
        start = time.perf_counter()
        try:
            scores[name] = attribution.query_scores(name, batches).cpu()
        except Exception as error:
            results[name] = _failed(error)
            log(f"  {name}: failed on the other queries ({results[name]['reason']})")
            continue
        results[name] = {"status": "ok", **class_metrics(scores[name], train_labels, labels),
                         "seconds": time.perf_counter() - start}
    return results, scores
