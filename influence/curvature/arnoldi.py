"""``Arnoldi``: a low-rank eigendecomposition of ``C`` from Krylov iterations (Schioppa et al.)."""

from __future__ import annotations

import torch

from .._params_base import check_is_fitted
from .._progress import solver_progress
from ..exceptions import CurvatureError
from ._operator import OperatorCurvature

OFF_SUBSPACE = ("damping", "zero")
#: Up to this many parameters, and from ``num_iters >= P / 4`` on, the eigenpairs come from the
#: dense matrix (its ``P × P`` float64 matrix takes 200 MB at 5,000 parameters).
DENSE_MAX_PARAMS = 5000


def lanczos(matmat, P: int, num_iters: int, seed: int = 0, device=None):
    """Lanczos with full re-orthogonalisation (Arnoldi for a symmetric operator), float64.

    Args:
        matmat: ``V (1, P) ↦ A V`` row-wise, ``A`` symmetric.
        P: dimension.
        num_iters: Krylov dimension ``k <= P``.
        seed: seed of the random start vector (and of restarts on breakdown).

    With progress on (:mod:`influence._progress`), a bar counts the iterations and shows the
    relative residual of the Lanczos relation, ``β_j / ‖T‖`` with ``β_j = ‖A q_j − α_j q_j −
    β_{j−1} q_{j−1}‖`` (re-orthogonalised) and ``‖T‖`` estimated by the largest ``|α|``, ``β``
    so far: it bounds the relative residuals ``‖A y − θ y‖`` of the Ritz pairs and reaches ~0
    once the Krylov space is invariant.

    Returns:
        ``(eigenvalues (k,), eigenvectors (P, k))``: the Ritz pairs, eigenvalues descending by
        magnitude. With ``k = P`` they are ``A``'s exact eigenpairs up to rounding.
    """
    g = torch.Generator().manual_seed(seed)
    Q = torch.zeros(num_iters, P, dtype=torch.float64, device=device)
    alpha = torch.zeros(num_iters, dtype=torch.float64)
    beta = torch.zeros(max(num_iters - 1, 0), dtype=torch.float64)
    q = torch.randn(P, generator=g, dtype=torch.float64).to(device)
    q = q / q.norm()
    scale = 0.0
    with solver_progress("Lanczos", num_iters) as bar:
        for j in range(num_iters):
            Q[j] = q
            w = matmat(q[None])[0].to(torch.float64)
            alpha[j] = w @ q
            for _ in range(2):  # twice is enough (Kahan–Parlett)
                w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            norm = float(w.norm())
            scale = max(scale, abs(float(alpha[j])), norm)
            if bar is not None:
                bar.update(residual=norm / max(scale, 1e-300))
            if j + 1 == num_iters:
                if bar is not None:
                    bar.finish(residual=norm / max(scale, 1e-300))
                break
            if norm <= 1e-10 * max(scale, 1e-300):  # invariant subspace: restart orthogonally
                w = torch.randn(P, generator=g, dtype=torch.float64).to(device)
                for _ in range(2):
                    w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
                norm, beta[j] = float(w.norm()), 0.0
            else:
                beta[j] = norm
            q = w / norm
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    values, vectors = torch.linalg.eigh(T)
    order = values.abs().argsort(descending=True)
    return values[order].to(device), Q.T @ vectors[:, order].to(device)


class Arnoldi(OperatorCurvature):
    """Top-``rank`` eigenpairs of ``C`` by Lanczos, inverted exactly on their span.

    Schioppa, Zablotskaia, Vilar, Sokolov, "Scaling Up Influence Functions", AAAI 2022: run
    ``num_iters`` Arnoldi steps on matrix-free products of ``C`` (for a symmetric ``C``
    Arnoldi is Lanczos; here with full re-orthogonalisation in float64), keep the ``rank`` Ritz
    pairs ``(μ_i, u_i)`` largest in magnitude, ``C ≈ U diag(μ) Uᵀ``. Then

    - ``off_subspace="damping"`` (default): ``solve(g) = U diag(1/(μ+λ)) Uᵀ g + (g − UUᵀg)/λ``,
      the exact inverse of ``U diag(μ) Uᵀ + λI`` (``C`` taken as 0 off the subspace). At
      ``rank = num_iters = P`` this equals :class:`Exact`; the error falls as ``rank`` grows.
      Needs ``λ > 0``.
    - ``off_subspace="zero"``: Schioppa's projection, ``solve(g) = U diag(1/(μ+λ)) Uᵀ g``,
      discarding the rest (a pseudo-inverse; ``matmat`` is then ``U diag(μ+λ) Uᵀ``).

    :meth:`project` returns ``diag((μ+λ)^{-1/2}) Uᵀ g`` (``(n, rank)``): inner products of
    projected query and training gradients are the subspace part of the scores (the whole
    score for ``off_subspace="zero"``), at ``O(rank)`` per pair. Fitting costs ``num_iters``
    passes over the data and ``num_iters × P`` float64 memory. ``matmat`` applies the low-rank
    approximation; ``residual`` measures against the exact operator.

    A Krylov space of a quarter or more of the parameters (``4·num_iters >= P``, with
    ``P <= 5000``) costs more in ``num_iters`` sequential one-vector passes than the dense
    ``C`` does in a few passes of many columns each (as :class:`Exact` builds it; the GGN of a
    classifier by one matrix product of output Jacobians). There the fit builds the dense ``C``
    and takes its top-``rank`` eigenpairs from ``torch.linalg.eigh`` (float64): the pairs
    Lanczos converges to, exact rather than approximate, and at full rank (``num_iters = P``)
    the same result as Lanczos up to rounding. ``dense_`` records which way was taken.

    Args:
        damping: ``λ``.
        rank: eigenpairs kept (capped at the number of parameters ``P``).
        curvature_type: ``"ggn"`` (default, positive semi-definite), ``"hessian"`` (indefinite
            on non-convex models: needs damping above its most negative eigenvalue) or
            ``"fisher"``.
        num_iters: Krylov dimension (``None``: ``min(P, 2·rank)``); at least ``rank``.
        off_subspace: ``"damping"`` or ``"zero"``.
        seed: seed of the start vector (and of ``num_samples``).
        num_samples: build ``C`` from this many seeded random examples.
        chunk_size: rows per vmapped curvature product.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask, Exact
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> loader = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> arn = Arnoldi(damping=0.1, rank=8).fit(model, ClassificationTask(), loader)
        >>> exact = Exact(damping=0.1).fit(model, ClassificationTask(), loader)
        >>> G = torch.randn(3, 8, dtype=torch.float64)
        >>> torch.allclose(arn.solve(G), exact.solve(G)), tuple(arn.project(G).shape)
        (True, (3, 8))
    """

    def __init__(
        self,
        damping: float = 1e-3,
        rank: int = 20,
        curvature_type: str = "ggn",
        num_iters: int | None = None,
        off_subspace: str = "damping",
        seed: int = 0,
        num_samples: int | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__(damping=damping)
        self.rank = rank
        self.curvature_type = curvature_type
        self.num_iters = num_iters
        self.off_subspace = off_subspace
        self.seed = seed
        self.num_samples = num_samples
        self.chunk_size = chunk_size

    def _fit(self, model, task, loader, layout):
        P = layout.num_params
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"Arnoldi: rank must be a positive integer; got {self.rank!r}.")
        rank = min(self.rank, P)
        iters = min(P, 2 * rank) if self.num_iters is None else self.num_iters
        if isinstance(iters, bool) or not isinstance(iters, int) or not rank <= iters <= P:
            raise ValueError(
                f"Arnoldi: num_iters must be an integer in [rank={rank}, {P}] ({P} = attributed "
                f"parameters); got {iters!r}."
            )
        if self.off_subspace not in OFF_SUBSPACE:
            raise ValueError(
                f"Invalid off_subspace {self.off_subspace!r}. Supported: {OFF_SUBSPACE}."
            )
        operator = self._make_operator(model, task, loader, layout)
        self.dense_ = P <= DENSE_MAX_PARAMS and 4 * iters >= P
        if self.dense_:
            values, vectors = torch.linalg.eigh(operator.dense())
            order = values.abs().argsort(descending=True)
            values, vectors = values[order], vectors[:, order]
        else:
            values, vectors = lanczos(operator.matmat, P, iters, self.seed, operator.device)
        self.eigenvalues_ = values[:rank]
        self.eigenvectors_ = vectors[:, :rank].contiguous()

    def _shifted(self, damping: float) -> torch.Tensor:
        """``μ + λ``, checked positive (needed to invert or take square roots)."""
        shifted = self.eigenvalues_ + damping
        if bool((shifted <= 0).any()):
            raise CurvatureError(
                f"Arnoldi({self.curvature_type!r}): eigenvalue {float(self.eigenvalues_.min()):.3g}"
                f" + damping {damping:g} <= 0 (indefinite curvature). Use curvature_type='ggn' "
                f"or damping > {float(-self.eigenvalues_.min()):.3g}."
            )
        return shifted

    def _apply(self, G: torch.Tensor, damping: float, inverse: bool) -> torch.Tensor:
        U = self.eigenvectors_
        V = G.to(U.device, torch.float64)
        coords = V @ U
        if inverse:
            out = (coords / self._shifted(damping)) @ U.T
        else:
            out = (coords * (self.eigenvalues_ + damping)) @ U.T
        if self.off_subspace == "damping":
            if inverse and damping <= 0:
                raise CurvatureError(
                    "Arnoldi with off_subspace='damping' divides by the damping off the "
                    "subspace: use damping > 0, or off_subspace='zero'."
                )
            rest = V - coords @ U.T
            out = out + (rest / damping if inverse else rest * damping)
        return out.to(G.device)

    def _solve(self, G, damping):
        return self._apply(G, damping, inverse=True)

    def _matmat(self, V, damping):
        return self._apply(V, damping, inverse=False)

    def project(self, G: torch.Tensor, damping: float | None = None) -> torch.Tensor:
        """``diag((μ+λ)^{-1/2}) Uᵀ g`` for each row ``g`` of ``G`` (``(n, P)`` → ``(n, rank)``).

        ``project(G_test) @ project(G_train).T`` is the subspace part of the scores.
        """
        check_is_fitted(self, "layout_", "project()")
        G = self._check_rows(G, "G")
        U = self.eigenvectors_
        coords = G.to(U.device, torch.float64) @ U
        return (coords * self._shifted(self._damping(damping)).rsqrt()).to(G.device, G.dtype)
