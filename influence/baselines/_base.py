"""The shared machinery of the baselines: fit, pairwise scores, self scores and top-k.

Every baseline scores a query ``z`` against a training example ``z_j`` as a sum over
*components* (checkpoints, ensemble members, or just one) of inner products of features::

    score(z, z_j) = Σ_c ⟨q_c(z), t_c(z_j)⟩

where ``q_c`` are the query-side features (already weighted, normalised or preconditioned) and
``t_c`` the training-side features. Subclasses only say how a batch becomes features
(:meth:`Baseline._features`); streaming over the training set, self-scores, top-k and the
checks live here once. The sign convention is the library's: larger = more responsible
(more helpful to the query).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .._loader import iterate_batches, warn_if_shuffled
from .._params_base import ParamsMixin, check_is_fitted
from .._topk import check_k, streaming_top_k
from ..curvature._base import check_instance
from .._guards import check_finite
from ..exceptions import ModelChangedError
from ..gradients.functional import per_sample_grads
from ..params import parameter_fingerprint, select_parameters
from ..tasks import ClassificationTask, Task

#: Roles of a features call: query side (measurement), training side (loss), and the query
#: side computed from the training loss (for self-scores).
ROLES = ("query", "train", "self")


class Baseline(ParamsMixin, ABC):
    """Base class of the baselines; the estimator interface of :class:`InfluenceEstimator`.

    Fitted attributes: ``model_``, ``task_``, ``train_loader_``, ``num_train_``.

    Examples:
        Every baseline in :data:`BASELINES` is used like the estimator:

        >>> import torch, influence
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = [(torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> baseline = influence.GradientSimilarity().fit(model, data)
        >>> isinstance(baseline, influence.Baseline), baseline.pairwise_scores(data).shape
        (True, torch.Size([6, 6]))
        >>> values, indices = baseline.top_k(data, k=2)
        >>> indices.shape
        torch.Size([6, 2])
    """

    task: Task | None

    # ----------------------------------------------------------------------------- fitting
    def fit(self, model: nn.Module, train_loader: Iterable[Any]) -> "Baseline":
        """Stores the model and training data and fits what the baseline needs; returns self."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        task = ClassificationTask() if self.task is None else self.task
        check_instance(task, Task, "task")
        warn_if_shuffled(train_loader, "train_loader")
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, key)
        self.model_ = model
        self.task_ = task
        self.train_loader_ = train_loader
        self._fit(model, train_loader)
        self.num_train_ = sum(
            task.num_examples(b) for b in iterate_batches(train_loader, "train_loader")
        )
        self.fingerprint_ = parameter_fingerprint(model, select_parameters(model, "all"))
        return self

    def _fit(self, model: nn.Module, train_loader: Iterable[Any]) -> None:
        """Hook: fitted state beyond the model and loader (default: none)."""

    # ----------------------------------------------------------------------------- features
    @abstractmethod
    def _features(self, batch: Any, role: str) -> list[torch.Tensor]:
        """One ``(B, D_c)`` feature block per component for ``role`` in :data:`ROLES`."""

    def _train_feature_blocks(self, loader: Iterable[Any]) -> Iterator[list[torch.Tensor]]:
        """Training-side features, one list per batch (subclasses may serve a cache)."""
        for batch in iterate_batches(loader, "train_loader"):
            yield self._features(batch, "train")

    def _check_model(self, method: str) -> None:
        check_is_fitted(self, "model_", method)
        layout = select_parameters(self.model_, "all")
        if parameter_fingerprint(self.model_, layout) != self.fingerprint_:
            raise ModelChangedError(
                f"The model's parameters changed after {type(self).__name__}.fit() (e.g. more "
                "training steps or loading other weights). Call fit(model, train_loader) again."
            )

    def _query_features(self, test_loader: Iterable[Any]) -> list[torch.Tensor]:
        blocks = [self._features(b, "query") for b in iterate_batches(test_loader, "test_loader")]
        return [torch.cat(parts) for parts in zip(*blocks)]

    def _train(self, loader: Iterable[Any] | None) -> Iterable[Any]:
        if loader is None:
            return self.train_loader_
        warn_if_shuffled(loader, "train_loader")
        return loader

    def _score_blocks(self, test_loader, train_loader) -> Iterator[torch.Tensor]:
        queries = self._query_features(test_loader)
        for parts in self._train_feature_blocks(self._train(train_loader)):
            yield sum(q @ t.to(q.dtype).T for q, t in zip(queries, parts))

    # ----------------------------------------------------------------------------- scores
    def pairwise_scores(
        self, test_loader: Iterable[Any], train_loader: Iterable[Any] | None = None
    ) -> torch.Tensor:
        """Scores of every training example on every query, shape ``(n_test, n_train)``.

        Query features are computed once and held; the training set is streamed one batch at a
        time. ``train_loader`` defaults to the one given to ``fit``.
        """
        self._check_model("pairwise_scores()")
        return torch.cat(list(self._score_blocks(test_loader, train_loader)), dim=1)

    def self_scores(self, loader: Iterable[Any] | None = None) -> torch.Tensor:
        """Score of each example on itself (query side from its loss), shape ``(n,)``."""
        self._check_model("self_scores()")
        out = []
        for batch in iterate_batches(self._train(loader), "loader"):
            pairs = zip(self._features(batch, "self"), self._features(batch, "train"))
            out.append(sum((q * t.to(q.dtype)).sum(1) for q, t in pairs))
        return torch.cat(out)

    def top_k(
        self,
        test_loader: Iterable[Any],
        k: int,
        largest: bool = True,
        train_loader: Iterable[Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` highest (``largest=False``: lowest) scoring training examples per query.

        Streams the training set keeping a running top-k: memory ``O(n_test · k)``.

        Returns:
            ``(values, indices)``, each ``(n_test, k)``, most extreme first.
        """
        check_k(k)
        self._check_model("top_k()")
        return streaming_top_k(self._score_blocks(test_loader, train_loader), k, largest)


class GradientBaseline(Baseline):
    """A baseline built on per-example gradients (task loss for training, measurement for queries).

    Args:
        task: reads batches; default ``ClassificationTask()``.
        params: attributed parameters (see :func:`influence.params.select_parameters`).
        chunk_size: examples per vmap chunk for per-example gradients.
    """

    def _grads(self, model: nn.Module, batch: Any, role: str) -> torch.Tensor:
        objective = "measurement" if role == "query" else "loss"
        G = per_sample_grads(model, self.task_, batch, self.params, self.chunk_size, objective)
        side = "test" if role == "query" else "train"
        check_finite(G, 0, f"{side} (indices within the batch)")
        return G


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Validates a string-valued mode."""
    if value not in choices:
        raise ValueError(f"Invalid {name} {value!r}. Supported: {choices}.")
    return value


def as_models(model: nn.Module, checkpoints: Any, what: str) -> list[nn.Module]:
    """Turns a list of models and/or state dicts into models (state dicts loaded into copies)."""
    import copy

    if isinstance(checkpoints, (nn.Module, dict)) or not isinstance(checkpoints, (list, tuple)):
        raise TypeError(
            f"{what} must be a list of models or state dicts; got {type(checkpoints).__name__}. "
            f"Wrap a single one in a list: {what}=[...]."
        )
    if not checkpoints:
        raise ValueError(f"{what} is empty: pass at least one model or state dict.")
    models = []
    for i, ck in enumerate(checkpoints):
        if isinstance(ck, nn.Module):
            models.append(ck)
        elif isinstance(ck, dict):
            m = copy.deepcopy(model)
            try:
                m.load_state_dict(ck)
            except RuntimeError as error:
                raise ValueError(
                    f"{what}[{i}] does not fit the model: {str(error).splitlines()[0]}. Pass "
                    "state dicts saved from the same architecture (model.state_dict())."
                ) from None
            models.append(m.eval())
        else:
            raise TypeError(
                f"{what}[{i}] must be an nn.Module or a state dict; got {type(ck).__name__}."
            )
    return models
