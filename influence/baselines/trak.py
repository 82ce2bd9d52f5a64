"""``TRAK``: randomly projected gradients with a projected Gauss-Newton inverse."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .._loader import iterate_batches
from ..exceptions import CurvatureError
from ..params import ParamSpec
from ..tasks import Task
from ._base import GradientBaseline, as_models, check_choice

PROJECTIONS = ("gaussian", "rademacher")
_BLOCK_ROWS = 2048  # rows of the projection generated from one seed: chunking never changes it


class RandomProjection:
    """A seeded dense ``P × k`` random matrix ``R`` applied as ``G ↦ G R`` in row blocks.

    Entries are ``N(0, 1/k)`` (``"gaussian"``) or ``±1/√k`` (``"rademacher"``), so
    ``E[R Rᵀ] = I`` and inner products are preserved in expectation (Johnson-Lindenstrauss).
    Rows come in blocks of 2048, block ``b`` drawn from seed ``(seed, b)``: the matrix is
    regenerated block by block when it is larger than ``max_cached`` entries, and is identical
    whether cached or not.
    """

    def __init__(self, num_params: int, dim: int, kind: str, seed: int, max_cached: int):
        self.num_params, self.dim, self.kind, self.seed = num_params, dim, kind, seed
        self.cached = None
        if num_params * dim <= max_cached:
            self.cached = torch.cat([self._block(b) for b in range(self._num_blocks())])

    def _num_blocks(self) -> int:
        return -(-self.num_params // _BLOCK_ROWS)

    def _block(self, b: int) -> torch.Tensor:
        rows = min(_BLOCK_ROWS, self.num_params - b * _BLOCK_ROWS)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        if self.kind == "gaussian":
            R = torch.randn(rows, self.dim, generator=g, dtype=torch.float64)
        else:
            R = torch.randint(0, 2, (rows, self.dim), generator=g).double() * 2 - 1
        return R / self.dim**0.5

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            self.cached = self.cached.to(G)
            return G @ self.cached
        out = G.new_zeros(G.shape[0], self.dim)
        for b in range(self._num_blocks()):
            start = b * _BLOCK_ROWS
            R = self._block(b).to(G)
            out += G[:, start : start + R.shape[0]] @ R
        return out


class TRAK(GradientBaseline):
    """TRAK-style attribution (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale").

    For each model ``m`` of the ensemble, gradients are projected to ``k`` dimensions,
    ``φ = R_mᵀ ∇`` with a seeded random ``R_m`` (:class:`RandomProjection`), and::

        score(z, z_j) = (1/M) Σ_m φ_m(z)ᵀ (Φ_mᵀΦ_m / N + λI)⁻¹ φ_m(z_j)

    where ``Φ_m`` stacks the projected training-loss gradients (``N × k``): the Gauss-Newton
    (empirical Fisher) matrix of the mean training loss in projected space, damped by ``λ``.
    Query features use the measurement's gradient, training features the loss gradient, so
    positive = helpful. Unlike the original TRAK this uses the task's loss gradients rather
    than margin gradients with a ``(1 - p)`` reweighting; the normalisation by ``N`` matches the
    library's curvature convention so that ``damping`` means the same as elsewhere.

    Cost: one pass over the training data per model at ``fit`` (projected training features,
    ``N × k`` per model, are cached and reused when scoring the fitted training set) and
    ``2·P·k`` FLOPs per example for the dense projection.

    Args:
        projection_dim: ``k``.
        damping: ``λ``.
        models: ensemble members (models or state dicts of the fitted model's architecture,
            e.g. independently trained models or checkpoints); ``None``: the fitted model only.
        projection: ``"gaussian"`` or ``"rademacher"``.
        seed: seed of the projections (member ``m`` uses ``seed + m``).
        max_cached: largest projection (in entries) kept in memory; larger ones are regenerated
            in blocks on every use.
        task: reads batches; default ``ClassificationTask()``.
        params: attributed parameters.
        chunk_size: examples per vmap chunk for per-example gradients.

    Fitted attributes: ``models_``, ``projections_``, ``inverses_`` (``k × k`` per member),
    ``train_features_``.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> trak = TRAK(projection_dim=4, damping=1e-2).fit(model, data)
        >>> trak.pairwise_scores(data).shape
        torch.Size([6, 6])
    """

    def __init__(
        self,
        projection_dim: int = 512,
        damping: float = 1e-3,
        models: Sequence | None = None,
        projection: str = "gaussian",
        seed: int = 0,
        max_cached: int = 2**24,
        task: Task | None = None,
        params: ParamSpec = "trainable",
        chunk_size: int | None = None,
    ):
        self.projection_dim = projection_dim
        self.damping = damping
        self.models = models
        self.projection = projection
        self.seed = seed
        self.max_cached = max_cached
        self.task = task
        self.params = params
        self.chunk_size = chunk_size

    def _fit(self, model, train_loader):
        from ..curvature._base import check_damping
        from ..params import select_parameters

        check_choice(self.projection, "projection", PROJECTIONS)
        lam = check_damping(self.damping, "TRAK")
        k = self.projection_dim
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"projection_dim must be a positive integer; got {k!r}.")
        self.models_ = [model] if self.models is None else as_models(model, self.models, "models")
        P = select_parameters(self.models_[0], self.params).num_params
        self.projections_ = [
            RandomProjection(P, k, self.projection, self.seed + m, self.max_cached)
            for m in range(len(self.models_))
        ]
        batches = [
            self._member_features(batch, "train")
            for batch in iterate_batches(train_loader, "train_loader")
        ]
        self.inverses_ = []
        for m in range(len(self.models_)):
            Phi = torch.cat([feats[m] for feats in batches]).double()
            K = Phi.T @ Phi / Phi.shape[0] + lam * torch.eye(k, dtype=torch.float64, device=Phi.device)
            L, info = torch.linalg.cholesky_ex(K)
            if int(info) != 0:
                raise CurvatureError(
                    "TRAK: the projected Gauss-Newton matrix + damping is not positive definite "
                    f"(damping={lam:g}). Use damping > 0."
                )
            self.inverses_.append(torch.cholesky_inverse(L))
        self.train_features_ = batches  # [batch][member] -> (B, k)

    def _member_features(self, batch: Any, role: str) -> list[torch.Tensor]:
        return [proj(self._grads(m, batch, role)) for m, proj in zip(self.models_, self.projections_)]

    def _features(self, batch, role):
        feats = self._member_features(batch, role)
        if role == "train":
            return feats
        M = len(feats)
        return [(f.double() @ inv).to(f.dtype) / M for f, inv in zip(feats, self.inverses_)]

    def _train_feature_blocks(self, loader):
        if loader is self.train_loader_:
            yield from self.train_features_
        else:
            yield from super()._train_feature_blocks(loader)
