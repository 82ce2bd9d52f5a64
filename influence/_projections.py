"""Seeded random projections and truncated SVDs of the query gradients (for :mod:`influence.scoring`)."""

from __future__ import annotations

import math

import torch


def _gaussian(seed: int, index: int, shape, k: int, like: torch.Tensor) -> torch.Tensor:
    """Seeded ``N(0, 1/k)`` entries, drawn on the CPU in float64 (identical on every device)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
    m = torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(k)
    return m.to(device=like.device, dtype=like.dtype)


def truncated_svd(W: torch.Tensor, r: int, seed: int = 0, oversample: int = 10, power_iters: int = 4):
    """Rank-``r`` factors ``(U_r S_r, V_rᵀ)`` of each matrix of ``W (n, m, k)``.

    When ``r`` is a sizeable fraction of ``min(m, k)`` (``2r + oversample >= min(m, k)``) this
    is the exact truncated SVD (so full rank reproduces ``W``). Otherwise it is the randomized
    SVD of Halko, Martinsson & Tropp (2011, Alg. 4.4 + 5.1): a seeded Gaussian test matrix of
    ``r + oversample`` columns, ``power_iters`` re-orthonormalised power iterations, and an exact
    SVD of the small projected matrix. Its cost is ``O(n·m·k·(r + oversample)·power_iters)``
    instead of the full SVD's ``O(n·m·k·min(m, k))`` (kronfluence's query batching computes the
    latter); for the decaying spectra of preconditioned gradients it matches the optimal rank-``r``
    error to a fraction of a percent (tests/test_scoring.py).
    """
    n, m, k = W.shape
    if 2 * r + oversample >= min(m, k):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[..., :r] * S[:, None, :r], Vh[:, :r]
    p = r + oversample
    g = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(k, p, generator=g, dtype=torch.float64).to(W)
    Q = torch.linalg.qr(W @ omega).Q  # (n, m, p): range of W
    Wt = W.transpose(1, 2)
    for _ in range(power_iters):
        Q = torch.linalg.qr(W @ torch.linalg.qr(Wt @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.transpose(1, 2) @ W, full_matrices=False)  # (n, p, k): small
    return (Q @ Ub[..., :r]) * S[:, None, :r], Vh[:, :r]
