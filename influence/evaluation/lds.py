"""Counterfactual benchmarks: the linear datamodeling score (LDS) and leave-one-out correlation.

Both compare predicted with actual effects of retraining. ``outputs`` are always the
retrained models' **measurements** ``m`` of the queries (the quantity the scores attribute,
the query loss by default). A positive score means the training example *lowers* ``m``, so
the predicted ``m`` of a model trained on a subset ``S`` falls with ``Σ_{j∈S} score_j``, and
removing ``j`` raises ``m`` by about ``score_j / N``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ._stats import as_array, bootstrap_interval, rowwise_pearson, rowwise_spearman


@dataclass
class LDSResult:
    """The linear datamodeling score.

    Attributes:
        mean: mean over queries of the per-query Spearman correlation (NaNs skipped).
        ci_low, ci_high: percentile bootstrap interval of ``mean`` (resampling queries).
        per_query: Spearman correlation of each query, ``(n_test,)``; NaN where the outputs
            or predictions are constant over subsets.
        n_subsets: number of retrained subsets.
    """

    mean: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray = field(repr=False)
    n_subsets: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_query"] = [None if not np.isfinite(v) else float(v) for v in self.per_query]
        return d

    def __str__(self) -> str:
        return f"LDS {self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] ({self.n_subsets} subsets)"


def linear_datamodeling_score(
    scores: Any,
    masks: Any,
    outputs: Any,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """LDS (Park et al. 2023): how well summed scores rank retrained models' outputs.

    For each query ``i`` and subset ``s``, the prediction is ``Σ_{j∈S_s} scores[i, j]``; the
    per-query LDS is the Spearman correlation over subsets between the prediction and
    ``−outputs[s, i]`` (a positive score lowers the measurement).

    Args:
        scores: ``(n_test, n_train)`` attribution scores.
        masks: ``(n_subsets, n_train)`` boolean (or 0/1) membership of each training subset.
        outputs: ``(n_subsets, n_test)`` measurements of the queries by the model retrained on
            each subset (e.g. the query loss; average several seeds per subset).
        n_bootstrap: bootstrap resamples of the queries for the interval.
        confidence: interval coverage.
        seed: seed of the bootstrap.

    Returns:
        :class:`LDSResult`.

    Examples:
        >>> import numpy as np
        >>> scores = np.array([[1.0, 2.0, 3.0]])
        >>> masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
        >>> outputs = -masks @ scores.T  # the measurement falls by the summed scores
        >>> round(linear_datamodeling_score(scores, masks, outputs).mean, 6)
        1.0
    """
    S = as_array(scores, "scores", (2,))
    M = as_array(masks, "masks", (2,))
    Y = as_array(outputs, "outputs", (2,))
    if M.shape[1] != S.shape[1]:
        raise ValueError(
            f"masks has {M.shape[1]} columns but scores has {S.shape[1]} training examples: "
            "masks must be (n_subsets, n_train) and scores (n_test, n_train)."
        )
    if Y.shape != (M.shape[0], S.shape[0]):
        raise ValueError(
            f"outputs must have shape (n_subsets, n_test) = {(M.shape[0], S.shape[0])}; got "
            f"{Y.shape}. Transpose it if it is (n_test, n_subsets)."
        )
    if M.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subsets to rank; got {M.shape[0]}.")
    predicted = M @ S.T  # (n_subsets, n_test)
    per_query = rowwise_spearman(predicted.T, -Y.T)
    finite = per_query[np.isfinite(per_query)]
    mean = float(finite.mean()) if finite.size else float("nan")
    low, high = bootstrap_interval(per_query, n_bootstrap, confidence, seed)
    return LDSResult(mean, low, high, per_query, int(M.shape[0]))


@dataclass
class SubsetRetraining:
    """Models retrained on random subsets.

    Attributes:
        masks: ``(n_subsets, n_train)`` boolean membership.
        outputs: ``(n_subsets, n_test)`` measurements averaged over seeds.
        outputs_per_seed: ``(n_subsets, n_seeds, n_test)``.
        seeds: the training seeds used for every subset.
    """

    masks: np.ndarray
    outputs: np.ndarray
    outputs_per_seed: np.ndarray
    seeds: tuple[int, ...]


def random_subset_masks(n_train: int, n_subsets: int, fraction: float, seed: int = 0) -> np.ndarray:
    """``(n_subsets, n_train)`` boolean masks, each of exactly ``round(fraction · n_train)`` ones."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1); got {fraction!r}.")
    size = int(round(fraction * n_train))
    if not 0 < size < n_train:
        raise ValueError(f"fraction={fraction} of {n_train} examples leaves an empty or full subset.")
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, size, replace=False)] = True
    return masks


def retrain_on_subsets(
    train_fn: Callable[[Any, int], Any],
    dataset: Any,
    n_subsets: int,
    fraction: float = 0.5,
    seeds: Sequence[int] = (0,),
    subset_seed: int = 0,
    progress: bool = True,
) -> SubsetRetraining:
    """Retrains on random subsets and records the query measurements (the LDS ground truth).

    Args:
        train_fn: ``train_fn(subset, seed) -> (n_test,)`` measurements of the queries by a
            model trained on ``subset`` with ``seed``; ``subset`` is a
            ``torch.utils.data.Subset`` of ``dataset`` (its ``.indices`` are the chosen indices,
            sorted).
        dataset: the training set (anything with ``len`` and indexing).
        n_subsets: number of subsets.
        fraction: subset size as a fraction of the training set.
        seeds: training seeds per subset; outputs are averaged over them.
        subset_seed: seed of the subset draws.
        progress: show a tqdm progress bar.

    Returns:
        :class:`SubsetRetraining`; pass ``masks`` and ``outputs`` to
        :func:`linear_datamodeling_score`.
    """
    from torch.utils.data import Subset
    from tqdm.auto import tqdm

    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable(subset, seed); got {type(train_fn).__name__}.")
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("seeds is empty: pass at least one training seed, e.g. seeds=(0,).")
    masks = random_subset_masks(len(dataset), n_subsets, fraction, subset_seed)
    runs = []
    bar = tqdm(total=n_subsets * len(seeds), desc="retraining", disable=not progress)
    for mask in masks:
        subset = Subset(dataset, np.flatnonzero(mask).tolist())
        row = []
        for seed in seeds:
            row.append(as_array(train_fn(subset, seed), "train_fn output", (1,)))
            bar.update()
        runs.append(row)
    bar.close()
    per_seed = np.array(runs)
    return SubsetRetraining(masks, per_seed.mean(1), per_seed, seeds)


@dataclass
class CorrelationResult:
    """Correlation between predicted and actual leave-one-out effects.

    Attributes:
        pearson, spearman: means over queries of the per-query correlations.
        per_query_pearson, per_query_spearman: ``(n_test,)``.
    """

    pearson: float
    spearman: float
    per_query_pearson: np.ndarray = field(repr=False)
    per_query_spearman: np.ndarray = field(repr=False)


def leave_one_out_correlation(scores: Any, loo_outputs: Any, base_outputs: Any) -> CorrelationResult:
    """Correlation of scores with the actual change of each query when one example is removed.

    The actual effect of removing training example ``j`` is
    ``loo_outputs[j, i] − base_outputs[i]`` (the measurement's rise); a correct score
    predicts it as ``scores[i, j] / N``, so the correlation should be positive.

    Args:
        scores: ``(n_test, n_removed)`` scores of the removed examples (columns in the order of
            ``loo_outputs``' rows).
        loo_outputs: ``(n_removed, n_test)`` measurements of models retrained without each
            example.
        base_outputs: ``(n_test,)`` measurements of the model trained on everything.
    """
    S = as_array(scores, "scores", (2,))
    L = as_array(loo_outputs, "loo_outputs", (2,))
    base = as_array(base_outputs, "base_outputs", (1,))
    if L.shape != (S.shape[1], S.shape[0]) or base.shape != (S.shape[0],):
        raise ValueError(
            f"Shapes do not match: scores {S.shape} (n_test, n_removed) needs loo_outputs "
            f"{(S.shape[1], S.shape[0])} (n_removed, n_test) and base_outputs ({S.shape[0]},); "
            f"got {L.shape} and {base.shape}."
        )
    actual = (L - base[None, :]).T  # (n_test, n_removed)
    p, s = rowwise_pearson(S, actual), rowwise_spearman(S, actual)
    return CorrelationResult(float(np.nanmean(p)), float(np.nanmean(s)), p, s)
