"""The study's class-membership metrics, computed from a score matrix ``(n_test, n_train)``.

A training example "explains" a query when it has the query's class. Scores rank training
examples from most helpful (largest) down.

- ``acc``: fraction of queries whose top-1 training example has the query's class.
- ``cover``: mean same-class fraction among each query's top ``k`` training examples, with
  ``k`` = the number of training examples of the query's class (``n_train / n_classes`` for
  the balanced tasks, 20 for the harmful task).
- ``auc``: mean over queries of the ROC AUC separating same-class training examples from the
  rest (the planted-set detection AUC for the harmful and backdoor tasks).
- ``chance``: the expected ``acc`` of a random ranking (and the expected ``cover``); AUC's
  chance level is 0.5.

When :mod:`influence.evaluation` provides ``top1_accuracy``, ``cover`` or ``auc`` with the
signature ``(scores, train_labels, test_labels)``, those are used; these local versions are
the fallback (one definition, here).
"""

from __future__ import annotations

import torch


def _labels(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long)


def local_top1_accuracy(scores, train_labels, test_labels) -> float:
    train_labels, test_labels = _labels(train_labels), _labels(test_labels)
    top = scores.argmax(dim=1)
    return float((train_labels[top] == test_labels).double().mean())


def local_cover(scores, train_labels, test_labels) -> float:
    train_labels, test_labels = _labels(train_labels), _labels(test_labels)
    values = []
    for row, y in zip(scores, test_labels):
        k = max(1, int((train_labels == y).sum()))
        top = row.topk(k).indices
        values.append(float((train_labels[top] == y).double().mean()))
    return sum(values) / len(values)


def local_auc(scores, train_labels, test_labels) -> float:
    """Mann-Whitney AUC per query (ties count one half), averaged over queries."""
    train_labels, test_labels = _labels(train_labels), _labels(test_labels)
    values = []
    for row, y in zip(scores.double(), test_labels):
        pos, neg = row[train_labels == y], row[train_labels != y]
        if len(pos) == 0 or len(neg) == 0:
            continue
        greater = (pos[:, None] > neg[None, :]).double().sum()
        ties = (pos[:, None] == neg[None, :]).double().sum()
        values.append(float((greater + 0.5 * ties) / (len(pos) * len(neg))))
    return sum(values) / len(values) if values else float("nan")


def chance(train_labels, test_labels) -> float:
    """Expected top-1 accuracy (and cover) of a random ranking."""
    train_labels, test_labels = _labels(train_labels), _labels(test_labels)
    return float(sum(float((train_labels == y).double().mean()) for y in test_labels) / len(test_labels))


def _metric(name: str, fallback):
    try:
        from .. import evaluation  # type: ignore[attr-defined]
    except ImportError:
        return fallback
    return getattr(evaluation, name, fallback)


def class_metrics(scores: torch.Tensor, train_labels, test_labels) -> dict[str, float]:
    """``{"acc", "cover", "auc"}`` of one score matrix (library versions when present)."""
    out = {}
    for key, name, fallback in (("acc", "top1_accuracy", local_top1_accuracy),
                                ("cover", "cover", local_cover), ("auc", "auc", local_auc)):
        fn = _metric(name, fallback)
        try:
            out[key] = float(fn(scores, train_labels, test_labels))
        except Exception:  # a library function with another signature: use ours
            out[key] = float(fallback(scores, train_labels, test_labels))
    return out
