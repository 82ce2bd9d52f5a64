"""``diagnose``: a trust report answering "does influence work on this model?".

Li et al. 2024 traced the failure of influence functions on fine-tuned LLMs to iHVP error,
unconverged training and rankings dominated by a few examples. ``diagnose`` measures each on
the user's own model, in one pass over the training data for the estimator's own scores:

1. **Convergence**: ``‖∇L(θ)‖`` of the mean training loss at the fitted parameters, and its
   ratio to the mean per-example gradient norm. Influence functions assume a stationary point.
2. **iHVP error** of the fitted curvature against a reference (``Exact`` when the attributed
   parameters are few, else both fitted on the last module block that fits).
3. **Rank agreement** with baselines (and the exact reference): mean per-query Spearman
   correlation and top-k overlap of the score rows.
4. **Dominance**: training examples taking the top-1 spot for a large share of queries (the
   study's cached scores had one example top-1 for 234 of 260 queries), and the concentration
   of the top-1 slots; both from :func:`~influence.evaluation.diagnose_scores` on the
   estimator's score matrix.
5. **Damping sensitivity**: rank agreement of scores at ``damping × factor`` with the fitted
   damping (damping is applied at solve time, so this needs no refit).

Flags are raised when (defaults in :data:`THRESHOLDS`, override with ``thresholds=``):

- ``gradient_norm_ratio > 0.05``: training has not converged (or the training objective had a
  term the task's loss lacks, e.g. weight decay, whose gradient is ``−λθ`` at the optimum);
- ``ihvp_relative_error > 0.3``: the curvature's iHVPs are more than 30 % off the reference;
- ``dominance_share >= 0.2`` (and at least ``dominance_min_count = 3`` queries): one training
  example is top-1 for at least a fifth of the queries (one flag per such example); a tied
  highest score in some queries is flagged too (their top-1 is the lowest tied index);
- ``damping_spearman < 0.5``: rankings change substantially when the damping moves by 10×.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .._params_base import check_is_fitted, clone
from ..curvature._base import Curvature
from ..curvature.exact import Exact
from ..exceptions import InfluenceError
from ..params import ParameterLayout
from ..tasks import OutputTask
from ._stats import rowwise_spearman, topk_overlap
from .ihvp import ihvp_error
from .report import DiagnosticReport
from .score_diagnostics import SCORE_THRESHOLDS, diagnose_scores

_DOMINANCE = ("dominance_share", "dominance_min_count")  # passed on to diagnose_scores
THRESHOLDS: dict[str, float] = {
    "gradient_norm_ratio": 0.05,
    "ihvp_relative_error": 0.3,
    **{key: SCORE_THRESHOLDS[key] for key in _DOMINANCE},
    "damping_spearman": 0.5,
}


def _label(method: Any) -> str:
    if hasattr(method, "similarity"):
        return f"{type(method).__name__}({method.similarity})"
    if hasattr(method, "curvature") and method.curvature is not None:
        return f"InfluenceEstimator({type(method.curvature).__name__})"
    return type(method).__name__


def _agreement(reference: np.ndarray, other: np.ndarray, k: int) -> tuple[float, float]:
    rho = rowwise_spearman(reference, other)
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"), float(
        topk_overlap(reference, other, k).mean()
    )


def _reference_scope(layout: ParameterLayout, max_params: int):
    """The whole layout if small enough, else the last module block that fits."""
    if layout.num_params <= max_params:
        return layout, slice(0, layout.num_params), "all attributed parameters"
    slices = layout.slices()
    for module, block in reversed(list(layout.module_blocks().items())):
        if block.stop - block.start <= max_params:
            names = [n for n in layout.names if slices[n].start >= block.start and slices[n].stop <= block.stop]
            sub = ParameterLayout(tuple(names), tuple(layout.shapes[layout.names.index(n)] for n in names))
            return sub, block, f"subset {module or '<root>'}"
    return None, None, None


def _ihvp_report(estimator, Q, train, reference, max_params) -> tuple[dict, Curvature | None]:
    """iHVP error of the estimator's curvature; also returns a full-layout reference if fitted."""
    cur = estimator.curvature_
    if reference is None:
        return {"skipped": "reference=None"}, None
    if isinstance(reference, Curvature):
        ref = clone(reference).fit(estimator.model_, estimator.task_, train, estimator.layout_)
        err = ihvp_error(cur, ref, Q)
        return _ihvp_row(type(reference).__name__, estimator.layout_.num_params, "all attributed parameters", err), ref
    ctype = getattr(cur, "curvature_type", None)
    ctype = ctype if ctype is not None else ("ggn" if isinstance(estimator.task_, OutputTask) else "hessian")
    if estimator.layout_.num_params > max_params and type(cur).__name__ != "CG":
        tight = _tight_cg(cur.damping, ctype)
        if tight is not None:  # CG to a tight tolerance on all parameters, when available
            try:
                ref = tight.fit(estimator.model_, estimator.task_, train, estimator.layout_)
                err = ihvp_error(cur, ref, Q)
                row = _ihvp_row(_describe_cg(tight), estimator.layout_.num_params, "all attributed parameters", err)
                return row, ref
            except Exception:  # noqa: BLE001 - fall back to Exact on a parameter subset
                pass
    sub, block, scope = _reference_scope(estimator.layout_, max_params)
    if sub is None:
        return {"skipped": f"no module block has <= {max_params} parameters (max_reference_params)"}, None
    full = block.stop - block.start == estimator.layout_.num_params
    ref = Exact(damping=cur.damping, curvature_type=ctype, max_params=max_params)
    try:
        ref.fit(estimator.model_, estimator.task_, train, sub)
        approx = cur if full else clone(cur).fit(estimator.model_, estimator.task_, train, sub)
        err = ihvp_error(approx, ref, Q[:, block])
    except InfluenceError as error:
        return {"skipped": f"reference failed: {str(error).splitlines()[0]}"}, None
    return _ihvp_row(f"Exact({ctype!r})", sub.num_params, scope, err), ref if full else None


def _tight_cg(damping: float, curvature_type: str) -> Curvature | None:
    """A ``CG`` curvature (from the registry, when installed) on ``curvature_type`` with its
    tolerances tightened."""
    from .. import curvature

    CG = getattr(curvature, "CG", None)
    if CG is None:
        return None
    cg = CG(damping=damping)
    known = cg.get_params(deep=False)
    tight = {"rtol": 1e-10, "tol": 1e-10, "atol": 0.0, "max_iter": 10_000, "curvature_type": curvature_type}
    return cg.set_params(**{k: v for k, v in tight.items() if k in known})


def _describe_cg(cg: Curvature) -> str:
    known = cg.get_params(deep=False)
    shown = ", ".join(f"{k}={known[k]!r}" for k in ("rtol", "tol", "max_iter") if k in known)
    return f"CG({shown})"


def _ihvp_row(name, num_params, scope, err) -> dict:
    return {
        "reference": name,
        "num_params": num_params,
        "scope": scope,
        "mean_relative_error": err.mean_relative_error,
        "mean_cosine": err.mean_cosine,
        "max_relative_error": float(err.relative_error.max()),
    }


def diagnose(
    estimator: Any,
    test_loader: Iterable[Any],
    train_loader: Iterable[Any] | None = None,
    *,
    reference: Curvature | str | None = "auto",
    compare: Sequence[Any] | Mapping[str, Any] | str | None = "auto",
    k: int = 10,
    damping_factors: Sequence[float] = (0.1, 10.0),
    max_reference_params: int = 2000,
    thresholds: Mapping[str, float] | None = None,
) -> DiagnosticReport:
    """Checks whether a fitted :class:`~influence.InfluenceEstimator` can be trusted here.

    Args:
        estimator: a fitted ``InfluenceEstimator``.
        test_loader: the queries to diagnose (a few dozen to a few hundred is enough).
        train_loader: training data; default the one given to ``fit``.
        reference: ``"auto"`` (``Exact`` with the curvature's ``curvature_type``, or GGN, on all
            attributed parameters if ``P <= max_reference_params``; else ``CG`` with tight
            tolerances on all parameters when ``influence.curvature.CG`` exists; else both the
            estimator's curvature and ``Exact`` refitted on the last module block that fits), a
            :class:`Curvature` instance fitted on all attributed parameters (e.g. CG with a tight
            tolerance), or ``None`` to skip.
        compare: methods to compare rankings with: ``"auto"`` (gradient dot product and
            cosine), a list or ``{name: method}`` of baselines or estimators (unfitted ones are
            fitted on the estimator's model and training data), or ``None``.
        k: the ``k`` of the top-k overlaps.
        damping_factors: damping multipliers for the sensitivity check.
        max_reference_params: the largest dense reference.
        thresholds: overrides of :data:`THRESHOLDS`.

    Returns:
        :class:`DiagnosticReport`.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask, Exact, InfluenceEstimator
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,)))]
        >>> est = InfluenceEstimator(Exact(damping=0.1)).fit(model, data)
        >>> report = diagnose(est, data, k=3)
        >>> report.ihvp["mean_relative_error"] < 1e-8
        True
    """
    from ..baselines import Baseline, GradientSimilarity

    if isinstance(estimator, Baseline):
        raise TypeError(
            f"diagnose() needs an InfluenceEstimator (it checks the curvature); got the baseline "
            f"{type(estimator).__name__}. Pass baselines to compare=[...] instead."
        )
    check_is_fitted(estimator, "curvature_", "diagnose()")
    estimator._check_model("diagnose()")
    limits = {**THRESHOLDS, **(thresholds or {})}
    unknown = set(limits) - set(THRESHOLDS)
    if unknown:
        raise ValueError(f"Unknown thresholds {sorted(unknown)}. Known: {sorted(THRESHOLDS)}.")
    train = estimator._train(train_loader)
    cur = estimator.curvature_

    Q = torch.cat(list(estimator._gradients(test_loader, "measurement", "test")))
    ihvp, full_ref = _ihvp_report(estimator, Q, train, reference, max_reference_params)

    lam = cur.damping
    dampings = [lam * f for f in damping_factors] if lam > 0 else []
    factors = {"fitted": cur.solve(Q)}
    for d in dampings:
        factors[d] = cur.solve(Q, damping=d)
    if full_ref is not None:
        factors["reference"] = full_ref.solve(Q)

    # one pass over the training data: gradient statistics and every score matrix
    columns: dict[Any, list[torch.Tensor]] = {key: [] for key in factors}
    grad_sum, norm_sum, n = 0.0, 0.0, 0
    for G in estimator._gradients(train, "loss", "train"):
        Gd = G.double()
        grad_sum = grad_sum + Gd.sum(0)
        norm_sum += float(Gd.norm(dim=1).sum())
        n += G.shape[0]
        for key, F in factors.items():
            columns[key].append((F.double() @ Gd.T))
    scores = {key: torch.cat(cols, 1).numpy() for key, cols in columns.items()}
    base = scores["fitted"]
    k = min(k, n)
    grad_norm = float(torch.as_tensor(grad_sum).norm() / n)
    mean_norm = norm_sum / n
    ratio = grad_norm / mean_norm if mean_norm > 0 else 0.0

    agreement = []
    if full_ref is not None:
        rho, overlap = _agreement(base, scores["reference"], k)
        agreement.append({"method": f"{ihvp['reference']} reference", "spearman": rho, "topk_overlap": overlap})
    methods = _methods(compare, estimator, GradientSimilarity)
    for name, method in methods.items():
        if getattr(method, "model_", None) is None:
            method = clone(method).fit(estimator.model_, train)
        other = method.pairwise_scores(test_loader, train).double().numpy()
        rho, overlap = _agreement(base, other, k)
        agreement.append({"method": name, "spearman": rho, "topk_overlap": overlap})

    by_scores = diagnose_scores(base, thresholds={key: limits[key] for key in _DOMINANCE})
    damping_rows = []
    for d in dampings:
        rho, overlap = _agreement(base, scores[d], k)
        damping_rows.append({"damping": d, "spearman": rho, "topk_overlap": overlap})

    flags = _flags(ratio, ihvp, by_scores.flags, damping_rows, limits)
    return DiagnosticReport(
        n_train=n,
        n_test=int(Q.shape[0]),
        num_params=estimator.layout_.num_params,
        curvature=repr(cur),
        k=k,
        gradient_norm=grad_norm,
        mean_example_gradient_norm=mean_norm,
        gradient_norm_ratio=ratio,
        ihvp=ihvp,
        agreement=agreement,
        dominance=by_scores.dominance,
        damping=damping_rows,
        flags=flags,
        thresholds=limits,
        concentration=by_scores.concentration,
    )


def _methods(compare, estimator, GradientSimilarity) -> dict[str, Any]:
    if compare is None:
        return {}
    if isinstance(compare, str):
        if compare != "auto":
            raise ValueError(f"Invalid compare {compare!r}: use 'auto', None, a list or a dict of methods.")
        kw = {"task": estimator.task_, "params": estimator.layout_, "chunk_size": estimator.chunk_size}
        return {
            "gradient dot": GradientSimilarity("dot", **kw),
            "gradient cosine": GradientSimilarity("cosine", **kw),
        }
    if isinstance(compare, Mapping):
        return dict(compare)
    return {_label(m): m for m in compare}


def _flags(ratio, ihvp, score_flags, damping_rows, limits) -> list[str]:
    """Convergence, iHVP error, then :func:`diagnose_scores`' flags (dominance, ties), then
    damping sensitivity."""
    flags = []
    if ratio > limits["gradient_norm_ratio"]:
        flags.append(
            f"not converged: |mean training gradient| / mean |example gradient| = {ratio:.3g} > "
            f"{limits['gradient_norm_ratio']:g}. Influence assumes a stationary point; train "
            "longer, or include weight decay in the task's loss if training used it."
        )
    err = ihvp.get("mean_relative_error")
    if err is not None and err > limits["ihvp_relative_error"]:
        flags.append(
            f"large iHVP error: mean relative error {err:.3g} > {limits['ihvp_relative_error']:g} "
            f"against {ihvp['reference']} ({ihvp['scope']}). Use a more accurate curvature or "
            "more iterations."
        )
    flags += score_flags
    for row in damping_rows:
        if np.isfinite(row["spearman"]) and row["spearman"] < limits["damping_spearman"]:
            flags.append(
                f"damping-sensitive: Spearman {row['spearman']:.3g} < {limits['damping_spearman']:g} "
                f"between scores at damping {row['damping']:.3g} and the fitted damping."
            )
    return flags
