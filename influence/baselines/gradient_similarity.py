"""``GradientSimilarity``: dot product or cosine of per-example gradients."""

from __future__ import annotations

import torch

from ..params import ParamSpec
from ..tasks import Task
from ._base import GradientBaseline, check_choice

SIMILARITIES = ("dot", "cosine")


def normalize_rows(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit Euclidean norm; zero rows stay zero."""
    norms = X.norm(dim=1, keepdim=True)
    return X / torch.where(norms > 0, norms, torch.ones_like(norms))


class GradientSimilarity(GradientBaseline):
    """Scores by gradient similarity, with no curvature.

    - ``"dot"``: ``score = ∇m(z_test)ᵀ ∇ℓ(z_j)`` ("gradient match" in Li et al. 2024, TracIn
      with one checkpoint and unit step; equals ``InfluenceEstimator(Identity())``).
    - ``"cosine"``: ``score = cos(∇m(z_test), ∇ℓ(z_j))``, which removes the gradient-norm effect
      that lets a few high-loss examples dominate every ranking.

    Args:
        similarity: ``"dot"`` or ``"cosine"``.
        task: reads batches; default ``ClassificationTask()``.
        params: attributed parameters.
        chunk_size: examples per vmap chunk for per-example gradients.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))]
        >>> sim = GradientSimilarity("cosine").fit(model, data)
        >>> sim.pairwise_scores(data).shape
        torch.Size([5, 5])
        >>> torch.allclose(sim.self_scores(), torch.ones(5))
        True
    """

    def __init__(
        self,
        similarity: str = "dot",
        task: Task | None = None,
        params: ParamSpec = "trainable",
        chunk_size: int | None = None,
    ):
        self.similarity = similarity
        self.task = task
        self.params = params
        self.chunk_size = chunk_size

    def _fit(self, model, train_loader):
        check_choice(self.similarity, "similarity", SIMILARITIES)

    def _features(self, batch, role):
        G = self._grads(self.model_, batch, role)
        return [normalize_rows(G) if self.similarity == "cosine" else G]
