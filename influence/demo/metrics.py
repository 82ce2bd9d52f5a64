"""The study's class-membership metrics, from a score matrix ``(n_test, n_train)``.

A training example "explains" a query when it has the query's class. Scores rank training
examples from most helpful (largest) down. Labels may be integers or strings (any values
compared with ``==``). The definitions live in :mod:`influence.evaluation`:

- ``acc``: :func:`~influence.evaluation.top1_accuracy`, the fraction of queries whose top-1
  training example has the query's class;
- ``cover``: :func:`~influence.evaluation.cover`, the same-class fraction among each query's top
  ``k`` training examples, ``k = n_train // n_classes`` (the size of a class when classes are
  balanced; the same ``k`` for every query, so a perfect method reaches 1 only on balanced
  tasks: on ``harmful`` at the default scale, 20 forbidden examples among 68, ``k = 34`` and
  the best possible Cover is 20/34);
- ``auc``: :func:`~influence.evaluation.roc_auc` per query, same-class training examples as the
  planted set (the detection AUC of the harmful and backdoor tasks);
- ``chance``: the expected ``acc`` (and ``cover``) of a random ranking; AUC's is 0.5.

Examples:
    >>> import torch
    >>> m = class_metrics(torch.tensor([[2.0, 1.0, 0.0]]), ["joy", "anger", "joy"], ["joy"])
    >>> m["acc"], m["cover"], m["auc"]
    (1.0, 1.0, 0.5)
    >>> chance(["joy", "anger", "joy"], ["joy"])
    0.6666666666666666
"""

from __future__ import annotations

import numpy as np

from .. import evaluation


def _labels(x, name: str) -> np.ndarray:
    labels = np.empty(len(x), dtype=object)
    labels[:] = [v.item() if hasattr(v, "item") else v for v in x]
    if labels.size == 0:
        raise ValueError(f"{name} is empty; pass one class label per example.")
    return labels


def chance(train_labels, test_labels) -> float:
    """Expected top-1 accuracy (and cover) of a random ranking: the mean over queries of the
    fraction of training examples in the query's class."""
    train, test = _labels(train_labels, "train_labels"), _labels(test_labels, "test_labels")
    return float(np.mean([np.mean(train == y) for y in test]))


def class_metrics(scores, train_labels, test_labels) -> dict[str, float]:
    """``{"acc", "cover", "auc"}`` of one score matrix ``(n_test, n_train)``."""
    train, test = _labels(train_labels, "train_labels"), _labels(test_labels, "test_labels")
    same_class = test[:, None] == train[None, :]
    return {
        "acc": float(evaluation.top1_accuracy(scores, train, test)),
        "cover": float(evaluation.cover(scores, train, test)),
        "auc": float(evaluation.roc_auc(scores, same_class)),
    }
