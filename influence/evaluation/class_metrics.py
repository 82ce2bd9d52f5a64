"""The class-based metrics of Li et al. 2024 ("Do Influence Functions Work on LLMs?").

The ground truth for a query is its class (task type, harmful category, ...): a good method
ranks training examples of the query's class first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._stats import as_array


def _check(scores: Any, train_labels: Any, test_labels: Any):
    S = as_array(scores, "scores", (2,))
    tr = np.asarray(as_array(train_labels, "train_labels", (1,), dtype=object))
    te = np.asarray(as_array(test_labels, "test_labels", (1,), dtype=object))
    if S.shape != (te.shape[0], tr.shape[0]):
        raise ValueError(
            f"scores must be (n_test, n_train) = {(te.shape[0], tr.shape[0])} from the labels; "
            f"got {S.shape}."
        )
    return S, tr, te


def top1_accuracy(scores: Any, train_labels: Any, test_labels: Any) -> float:
    """``Acc``: fraction of queries whose highest-scoring training example has their class.

    Examples:
        >>> top1_accuracy([[0.1, 0.9], [0.8, 0.2]], ["a", "b"], ["b", "b"])
        0.5
    """
    S, tr, te = _check(scores, train_labels, test_labels)
    return float(np.mean(tr[np.argmax(S, axis=1)] == te))


def cover(scores: Any, train_labels: Any, test_labels: Any, k: int | None = None) -> float:
    """``Cover``: mean fraction of same-class examples among each query's top ``k``.

    ``k`` defaults to ``n_train // n_classes`` (the size of a class when classes are
    balanced), so a perfect method reaches 1.

    Examples:
        >>> cover([[3, 2, 1, 0]], ["a", "a", "b", "b"], ["a"])
        1.0
        >>> cover([[3, 2, 1, 0]], ["a", "b", "a", "b"], ["a"])
        0.5
    """
    S, tr, te = _check(scores, train_labels, test_labels)
    if k is None:
        k = max(1, len(tr) // len(set(tr.tolist())))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(tr):
        raise ValueError(f"k must be an integer in [1, {len(tr)}] (n_train); got {k!r}.")
    top = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return float(np.mean(tr[top] == te[:, None]))
