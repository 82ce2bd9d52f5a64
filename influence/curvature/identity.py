"""``Identity``: no curvature, scores are (scaled) gradient dot products."""

from __future__ import annotations

import torch

from ._base import Curvature


class Identity(Curvature):
    """``C = 0``: ``solve(G) = G / λ``, so scores are ``∇m(z_test)ᵀ ∇ℓ(z_train) / λ``.

    With the default ``damping=1.0`` the scores are exactly the gradient dot products
    ("gradient match" in Li et al. 2024; TracIn with one checkpoint and unit step).

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask
        >>> model = torch.nn.Linear(2, 2)
        >>> loader = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))]
        >>> cur = Identity().fit(model, ClassificationTask(), loader)
        >>> G = torch.randn(3, 6)
        >>> torch.equal(cur.solve(G), G)
        True
    """

    def __init__(self, damping: float = 1.0):
        super().__init__(damping=damping)

    def _fit(self, model, task, loader, layout):
        pass  # nothing depends on the training data

    def _solve(self, G: torch.Tensor, damping: float) -> torch.Tensor:
        if damping == 0:
            raise ValueError(
                "Identity with damping=0 is singular (C = 0): use damping > 0; damping=1.0 "
                "gives plain gradient dot products."
            )
        return G / damping if damping != 1.0 else G.clone()

    def _matmat(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        return V * damping
