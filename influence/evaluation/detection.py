"""Planted-set detection (mislabeled, poisoned, harmful examples): ROC-AUC, precision@k,
recall@k.

``values`` rank the training examples (e.g. self-influence for mislabeled data, or a query's
scores for harmful data): larger = more suspicious. ``planted`` marks the true planted set.
Both may be ``(n_train,)`` or ``(n_queries, n_train)``; for 2-D inputs the metric is computed
per row and averaged (a 1-D ``planted`` is shared by all rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

from ._stats import as_array


def _rows(values: Any, planted: Any) -> tuple[np.ndarray, np.ndarray]:
    V = as_array(values, "values")
    Y = as_array(planted, "planted", dtype=bool)
    V2 = V[None] if V.ndim == 1 else V
    Y2 = np.broadcast_to(Y, V2.shape) if Y.ndim == 1 else Y
    if Y2.shape != V2.shape:
        raise ValueError(
            f"planted has shape {Y.shape} but values has {V.shape}: pass one flag per training "
            "example, (n_train,) or (n_queries, n_train)."
        )
    return V2, Y2


def roc_auc(values: Any, planted: Any) -> float:
    """Area under the ROC curve of ``values`` separating planted from clean examples.

    Equals the probability that a random planted example outranks a random clean one (ties
    count half): the Mann-Whitney statistic over ``n_planted · n_clean``.

    Examples:
        >>> roc_auc([0.9, 0.1, 0.8, 0.3], [True, False, False, False])
        1.0
        >>> roc_auc([0.5, 0.5], [True, False])
        0.5
    """
    V, Y = _rows(values, planted)
    out = []
    for v, y in zip(V, Y):
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if n_pos == 0 or n_neg == 0:
            raise ValueError(
                f"roc_auc needs both planted and clean examples; got {n_pos} planted and "
                f"{n_neg} clean."
            )
        ranks = rankdata(v)
        out.append((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(out))


def _hits_at_k(values: Any, planted: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    V, Y = _rows(values, planted)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= V.shape[1]:
        raise ValueError(f"k must be an integer in [1, {V.shape[1]}] (n_train); got {k!r}.")
    top = np.argsort(-V, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(Y, top, 1).sum(1), Y.sum(1)


def precision_at_k(values: Any, planted: Any, k: int) -> float:
    """Fraction of the ``k`` highest-ranked examples that are planted (mean over rows).

    Examples:
        >>> precision_at_k([0.9, 0.1, 0.8, 0.3], [True, False, False, True], k=2)
        0.5
    """
    hits, _ = _hits_at_k(values, planted, k)
    return float(np.mean(hits / k))


def recall_at_k(values: Any, planted: Any, k: int) -> float:
    """Fraction of the planted examples found among the ``k`` highest-ranked (mean over rows).

    Examples:
        >>> recall_at_k([0.9, 0.1, 0.8, 0.3], [True, False, False, True], k=2)
        0.5
    """
    hits, total = _hits_at_k(values, planted, k)
    if np.any(total == 0):
        raise ValueError("recall_at_k needs at least one planted example per row; got none.")
    return float(np.mean(hits / total))
