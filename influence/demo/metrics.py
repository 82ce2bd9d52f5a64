"""The study's class-membership metrics, from a score matrix ``(n_test, n_train)``.

A training example "explains" a query when it has the query's class. Scores rank training
examples from most helpful (largest) down. The definitions live in :mod:`influence.evaluation`:

- ``acc``: :func:`~influence.evaluation.top1_accuracy`, the fraction of queries whose top-1
  training example has the query's class;
- ``cover``: :func:`~influence.evaluation.cover`, the same-class fraction among each query's top
  ``k`` training examples (``k`` = the query's class size);
- ``auc``: :func:`~influence.evaluation.roc_auc` per query, same-class training examples as the
  planted set (the detection AUC of the harmful and backdoor tasks);
- ``chance``: the expected ``acc`` (and ``cover``) of a random ranking; AUC's is 0.5.
"""

from __future__ import annotations

import torch

from .. import evaluation


def _labels(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long)


def chance(train_labels, test_labels) -> float:
    """Expected top-1 accuracy (and cover) of a random ranking."""
    train_labels, test_labels = _labels(train_labels), _labels(test_labels)
    return float(sum(float((train_labels == y).double().mean()) for y in test_labels) / len(test_labels))


def class_metrics(scores: torch.Tensor, train_labels, test_labels) -> dict[str, float]:
    """``{"acc", "cover", "auc"}`` of one score matrix."""
    train_labels, test_labels = _labels(train_labels), _labels(test_labels)
    same_class = (test_labels[:, None] == train_labels[None, :]).numpy()
    return {
        "acc": float(evaluation.top1_accuracy(scores, train_labels, test_labels)),
        "cover": float(evaluation.cover(scores, train_labels, test_labels)),
        "auc": float(evaluation.roc_auc(scores, same_class)),
    }
