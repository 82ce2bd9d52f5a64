"""Array conversion and row-wise correlations shared by the evaluation metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata


def as_array(x: Any, name: str, ndim: tuple[int, ...] = (1, 2), dtype=np.float64) -> np.ndarray:
    """A numpy copy of a tensor/array-like, with its dimensionality checked."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x, dtype=dtype)
    if a.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions; got shape {a.shape}.")
    return a


def first_non_finite(S: np.ndarray) -> tuple[int, int, int] | None:
    """``(count, row, column)`` of the NaN/inf entries of a 2-D array, the first in row-major
    order; ``None`` when every entry is finite."""
    bad = ~np.isfinite(S)
    if not bad.any():
        return None
    i, j = np.argwhere(bad)[0]
    return int(bad.sum()), int(i), int(j)


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``; NaN for constant rows."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1), np.nan)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per row (average ranks for ties); NaN for constant rows."""
    return rowwise_pearson(rankdata(a, axis=1), rankdata(b, axis=1))


def bootstrap_interval(values: np.ndarray, n_bootstrap: int, confidence: float, seed: int):
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_bootstrap, values.size))].mean(1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row, the fraction of ``a``'s top-``k`` columns that are also in ``b``'s top-``k``."""
    k = min(k, a.shape[1])
    ta = np.argsort(-a, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b, axis=1, kind="stable")[:, :k]
    return np.array([len(set(x) & set(y)) / k for x, y in zip(ta, tb)])
