"""``CG``: conjugate gradient on matrix-free curvature products, all right-hand sides at once."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .._params_base import clone
from .._progress import solver_progress
from ..exceptions import ConvergenceWarning, CurvatureError
from ._base import Curvature, check_instance
from ._operator import OperatorCurvature, replicated_rows

Matmat = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CGInfo:
    """Per-row convergence report of :func:`block_cg`.

    Attributes:
        iterations: ``(n,)`` iterations each row took.
        residuals: ``(n,)`` final relative residuals ``‖b − A x‖ / ‖b‖`` (from the recurrence;
            0 for ``b = 0``).
        converged: ``(n,)`` whether each row reached ``‖r‖ <= max(rtol·‖b‖, atol)``.
        num_matmats: operator calls made (each on the still-active rows only).

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> B = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
        >>> X, info = block_cg(lambda V: V @ A, B, rtol=1e-10)
        >>> info.iterations.tolist(), info.converged.tolist()  # 3 and 1 distinct eigenvalues
        ([3, 1], [True, True])
    """

    iterations: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matmats: int


def _check_tolerances(rtol: Any, atol: Any, max_iter: Any, owner: str) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"{owner}: {name} must be a finite float >= 0; got {value!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{owner}: max_iter must be a positive integer; got {max_iter!r}.")


def block_cg(
    matmat: Matmat,
    B: torch.Tensor,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    precondition: Matmat | None = None,
) -> tuple[torch.Tensor, CGInfo]:
    """Solves ``A x_i = b_i`` for every row ``b_i`` of ``B`` by (preconditioned) CG.

    Each row runs its own CG recurrence (Hestenes–Stiefel: ``α = rᵀz / pᵀAp``,
    ``β = r'ᵀz' / rᵀz``, ``z = M⁻¹r``), but all active rows share one batched call
    ``matmat(P)`` per iteration, so the cost per iteration is one operator pass for all
    right-hand sides. Rows stop individually once ``‖r‖ <= max(rtol·‖b‖, atol)``. (This is
    batched CG; O'Leary's block CG, which shares Krylov spaces across rows, needs rank
    deflation when rows converge and is not used.)

    When progress bars are on (:mod:`influence._progress`: ``progress=True`` or stderr a
    terminal), a bar counts the iterations and shows the largest relative residual
    ``max_i ‖r_i‖ / ‖b_i‖`` over the rows and how many rows are still active; its final value
    is ``info.residuals.max()``.

    Args:
        matmat: ``V (m, P) ↦ A V`` row-wise, ``A`` symmetric positive definite.
        B: right-hand sides ``(n, P)``.
        rtol: stopping tolerance relative to ``‖b‖``.
        atol: absolute stopping tolerance.
        max_iter: iteration limit.
        precondition: ``R ↦ M⁻¹ R`` row-wise, ``M`` symmetric positive definite.

    Returns:
        ``(X, info)``: ``X`` of ``B``'s shape and a :class:`CGInfo`.

    Raises:
        CurvatureError: when ``pᵀAp <= 0`` for some row: ``A`` is not positive definite.

    Examples:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> B = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> X, info = block_cg(lambda V: V @ A, B, rtol=1e-12)
        >>> torch.allclose(X @ A, B), int(info.iterations[0])
        (True, 2)
    """
    n = B.shape[0]
    X = torch.zeros_like(B)
    R = B.clone()
    Z = precondition(R) if precondition is not None else R
    D = Z.clone()
    rz = (R * Z).sum(1)
    b_norm = B.norm(dim=1)
    tol = torch.clamp(rtol * b_norm, min=atol)
    active = R.norm(dim=1) > tol
    iterations = torch.zeros(n, dtype=torch.long, device=B.device)
    calls = 0
    with solver_progress(f"CG ({n} rows)", max_iter) as bar:
        r_norms = R.norm(dim=1) if bar is not None else None
        for step in range(max_iter):
            if not bool(active.any()):
                break
            idx = torch.nonzero(active).flatten()
            d = D[idx]
            Ad = matmat(d)
            calls += 1
            curvature = (d * Ad).sum(1)
            if bool((curvature <= 0).any()):
                j = int(torch.nonzero(curvature <= 0)[0, 0])
                raise CurvatureError(
                    f"Negative curvature: pᵀAp = {float(curvature[j]):.3g} <= 0 at CG iteration "
                    f"{step} (row {int(idx[j])}): the operator is not positive definite."
                )
            alpha = rz[idx] / curvature
            X[idx] += alpha[:, None] * d
            R[idx] -= alpha[:, None] * Ad
            r = R[idx]
            z = precondition(r) if precondition is not None else r
            rz_new = (r * z).sum(1)
            D[idx] = z + (rz_new / rz[idx])[:, None] * d
            rz[idx] = rz_new
            iterations[idx] += 1
            r_norm = r.norm(dim=1)
            active[idx] = r_norm > tol[idx]
            if bar is not None:
                r_norms[idx] = r_norm
                bar.update(residual=float(_relative_residuals(r_norms, b_norm).max()),
                           active=int(active.sum()))
        residuals = _relative_residuals(R.norm(dim=1), b_norm)
        if bar is not None:
            bar.finish(residual=float(residuals.max()) if n else 0.0, active=int(active.sum()))
    return X, CGInfo(iterations, residuals, ~active, calls)


def _relative_residuals(r_norms: torch.Tensor, b_norm: torch.Tensor) -> torch.Tensor:
    """``‖r‖ / ‖b‖`` per row, 0 for ``b = 0``."""
    relative = r_norms / b_norm.clamp_min(torch.finfo(b_norm.dtype).tiny)
    return torch.where(b_norm > 0, relative, torch.zeros_like(relative))


class CG(OperatorCurvature):
    """Conjugate gradient on ``(C + λI) X = G`` with exact matrix-free products of ``C``.

    ``C`` is the mean curvature of the training loss (``curvature_type`` ``"hessian"``,
    ``"ggn"`` or ``"fisher"``) over the loader or a seeded subsample (``num_samples``). Every
    ``solve`` runs :func:`block_cg` from ``x = 0`` on all rows of ``G`` at once: one pass over
    the training data per iteration. ``matmat`` is the exact operator ``C + λI``. After each
    ``solve``, ``last_info_`` holds the per-row :class:`CGInfo`; a
    :class:`~influence.ConvergenceWarning` is emitted when rows hit ``max_iter``.

    The default, ``curvature_type="ggn"`` (Gauss-Newton ``JᵀHJ``), is positive semi-definite on
    every model with a convex loss in the outputs (cross-entropy, squared error), as CG needs. The
    Hessian (``"hessian"``, kept for convex models and comparisons) of a non-convex model is
    indefinite: CG then meets ``pᵀ(C + λI)p <= 0`` and raises
    :class:`~influence.CurvatureError`; use ``"ggn"`` or more damping. With the positive
    semi-definite ``"ggn"`` and ``"fisher"`` the same error means ``C + λI`` is numerically
    singular (e.g. ``damping=0``): the message then asks for more damping.

    Under ``torch.distributed`` (no ``num_samples``) each product sums the ranks' shards
    (:mod:`._operator`), so ``solve`` is a collective: every rank must call it equally often;
    rows that differ across ranks are solved jointly (``last_info_`` then covers all ranks'
    rows) and each rank gets its own.

    Args:
        damping: ``λ``.
        curvature_type: ``"ggn"`` (default; needs an :class:`~influence.tasks.OutputTask`),
            ``"hessian"`` or ``"fisher"`` (empirical Fisher).
        rtol: relative tolerance of the per-row stopping rule ``‖r‖ <= max(rtol·‖g‖, atol)``.
        atol: absolute tolerance of that rule.
        max_iter: iteration limit (operator passes).
        preconditioner: ``None``; ``"diagonal"`` (Jacobi with the empirical-Fisher diagonal
            ``mean_j ∇ℓ(z_j)²`` plus ``λ``, an inexpensive stand-in for ``diag(C)``); or a
            :class:`Curvature` instance whose ``solve`` (at the same damping) approximates
            ``(C + λI)⁻¹``, e.g. ``EKFAC(fisher_type="expected")``: a fitted one with the same
            parameters is used as is, otherwise a clone is fitted on the same data. Measured
            (docs/iterative_curvature.md): with EK-FAC, 3-5 iterations give scores as close to
            exact as 10-20 plain ones; to a tight ``rtol`` a block-diagonal preconditioner does
            not reduce the iterations on deep networks (it misses the coupling between layers),
            only where the ill-conditioning lies within layers.
        num_samples: average ``C`` over this many seeded random examples (``None``: all).
        seed: seed of that subsample.
        chunk_size: rows per vmapped curvature product (memory bound).

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask, Exact
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> loader = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> cg = CG(damping=0.1, rtol=1e-10).fit(model, ClassificationTask(), loader)
        >>> G = torch.randn(4, 8, dtype=torch.float64)
        >>> exact = Exact(damping=0.1).fit(model, ClassificationTask(), loader)
        >>> torch.allclose(cg.solve(G), exact.solve(G)), bool(cg.last_info_.converged.all())
        (True, True)
    """

    def __init__(
        self,
        damping: float = 1e-3,
        curvature_type: str = "ggn",
        rtol: float = 1e-6,
        atol: float = 0.0,
        max_iter: int = 100,
        preconditioner: Curvature | str | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
    ):
        super().__init__(damping=damping)
        self.curvature_type = curvature_type
        self.rtol = rtol
        self.atol = atol
        self.max_iter = max_iter
        self.preconditioner = preconditioner
        self.num_samples = num_samples
        self.seed = seed
        self.chunk_size = chunk_size

    def _fit(self, model, task, loader, layout):
        _check_tolerances(self.rtol, self.atol, self.max_iter, "CG")
        pre = self.preconditioner
        if isinstance(pre, str) and pre != "diagonal" or not (
            pre is None or isinstance(pre, (str, Curvature))
        ):
            if isinstance(pre, type) and issubclass(pre, Curvature):
                check_instance(pre, Curvature, "preconditioner")
            raise ValueError(
                f"Invalid preconditioner {pre!r}. Supported: None, 'diagonal' or a Curvature "
                "instance (e.g. EKFAC(damping=...))."
            )
        operator = self._make_operator(model, task, loader, layout)
        if pre == "diagonal":
            self.diagonal_ = operator.mean_squared_gradients()
        elif isinstance(pre, Curvature):
            fitted = getattr(pre, "layout_", None) == layout
            self.preconditioner_ = pre if fitted else clone(pre).fit(model, task, loader, layout)

    def _precondition(self, damping: float):
        if getattr(self, "diagonal_", None) is not None:
            inverse = 1.0 / (self.diagonal_ + damping).clamp_min(torch.finfo(torch.float64).tiny)
            return lambda R: R * inverse
        if getattr(self, "preconditioner_", None) is not None:
            return lambda R: self.preconditioner_.solve(R, damping).double()
        return None

    @property
    def _collective_solve(self) -> bool:
        return self.operator_.sharded

    def _solve(self, G, damping):
        # with a sharded operator (torch.distributed) every product is a collective: rows that
        # differ across ranks (e.g. self-influence of each rank's shard) are solved jointly
        return replicated_rows(lambda B: self._solve_rows(B, damping), G, self.operator_.sharded)

    def _solve_rows(self, G, damping):
        operator = self.operator_
        B = G.to(operator.device, torch.float64)
        try:
            X, info = block_cg(
                lambda V: operator.matmat(V) + damping * V,
                B,
                rtol=self.rtol,
                atol=self.atol,
                max_iter=self.max_iter,
                precondition=self._precondition(damping),
            )
        except CurvatureError as error:
            if self.curvature_type == "hessian":
                why = (
                    "The hessian is indefinite here (typical of non-convex models). Use "
                    "curvature_type='ggn' (always positive semi-definite) or a larger damping."
                )
            else:
                why = (
                    f"The {self.curvature_type} is positive semi-definite, so C + damping·I is "
                    "numerically singular at this damping and rounding made pᵀAp negative. Use "
                    "a larger damping."
                )
            raise CurvatureError(f"CG({self.curvature_type!r}, damping={damping:g}): {error} {why}") from None
        self.last_info_ = info
        failed = int((~info.converged).sum())
        if failed:
            warnings.warn(
                f"CG reached max_iter={self.max_iter} with {failed} of {len(B)} rows not "
                f"converged (worst relative residual {float(info.residuals.max()):.3g}, "
                f"rtol={self.rtol:g}). Raise max_iter, loosen rtol, add damping or use a "
                "preconditioner. Per-row details: last_info_.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return X.to(G.device)
