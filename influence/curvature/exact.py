"""``Exact``: the dense curvature matrix of the mean training loss, for small parameter sets."""

from __future__ import annotations

import torch

from ..exceptions import CurvatureError
from .._params_base import check_is_fitted
from ._base import RCOND, Curvature, check_conditioning
from ..gradients.functional import per_sample_grads
from ._linearized import Linearizer
from ._products import check_curvature_type


class Exact(Curvature):
    """Dense ``C = (1/N) Σ_j C_j`` and a float64 Cholesky solve of ``C + λI``.

    ``curvature_type``:

    - ``"ggn"`` (default): Gauss-Newton ``J_jᵀ H_j J_j``, positive semi-definite; equals the
      true Fisher for cross-entropy and squared-error tasks. Needs an
      :class:`~influence.tasks.OutputTask`.
    - ``"hessian"``: ``C_j = ∇²ℓ(z_j)``. May be indefinite on non-convex models; a
      non-positive-definite ``C + λI`` is reported with its smallest eigenvalue. Equal to the
      GGN for a linear model (e.g. logistic regression).
    - ``"fisher"``: empirical Fisher ``∇ℓ(z_j)∇ℓ(z_j)ᵀ`` with the data's labels.

    The matrix is built per training batch the cheapest way available
    (:meth:`~._linearized.Linearizer.dense`): ``"fisher"`` as ``GᵀG`` from one per-example
    gradient pass; ``"ggn"`` as ``Σ_j J_jᵀ H_j J_j`` from the per-example output Jacobians (one
    matrix product) where those are small or cheap (e.g. a classifier with few classes, see
    :func:`~._linearized.jacobian_pays_off`); otherwise column block by column block
    from batched curvature-vector products (``chunk_size`` columns at once; by default as many
    as keep the intermediates near 256 MiB), ``P`` products per batch. ``max_params`` refuses
    parameter sets whose ``P × P`` float64 matrix would be too large. The Cholesky factor is
    cached per damping value. A ``C + λI`` that is not positive definite or is numerically
    singular (smallest eigenvalue ``<= 1e-12 ×`` largest, see
    :func:`~influence.curvature._base.check_conditioning`) raises
    :class:`~influence.CurvatureError` with the smallest damping that works: the test is
    proved by one extra Cholesky factorisation of a slightly shifted matrix, and only when that
    fails is the spectrum computed (:meth:`eigenvalue_summary`) to decide and report.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> loader = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> cur = Exact(damping=1e-2).fit(model, ClassificationTask(), loader)
        >>> cur.matrix_.shape
        torch.Size([8, 8])
        >>> V = torch.randn(2, 8, dtype=torch.float64)
        >>> torch.allclose(cur.solve(cur.matmat(V)), V)
        True
    """

    def __init__(
        self,
        damping: float = 1e-3,
        curvature_type: str = "ggn",
        max_params: int = 5000,
        chunk_size: int | None = None,
    ):
        super().__init__(damping=damping)
        self.curvature_type = curvature_type
        self.max_params = max_params
        self.chunk_size = chunk_size

    def _fit(self, model, task, loader, layout):
        check_curvature_type(self.curvature_type, task)
        P = layout.num_params
        if P > self.max_params:
            raise CurvatureError(
                f"Exact curvature over {P} parameters would need a dense {P}x{P} matrix, above "
                f"max_params={self.max_params}. Use an approximate curvature (CG, EKFAC, "
                "Arnoldi, DataInf), attribute fewer parameters (params=[...]), or raise "
                "max_params if you have the memory."
            )
        self._linearizer = Linearizer(self.curvature_type, model, task, layout)
        super()._fit(model, task, loader, layout)  # the statistics protocol

    def _batch_statistics(self, model, task, batch, layout, pass_index):
        first = next(iter(layout.tensors(model).values()))
        if self.curvature_type == "fisher":  # Σ_j g_j g_jᵀ from one gradient pass
            G = per_sample_grads(model, task, batch, layout).double()
            matrix = G.T @ G
        else:
            matrix = self._linearizer.dense(batch, self.chunk_size)
        count = torch.tensor(float(task.num_examples(batch)), dtype=torch.float64, device=first.device)
        return {"matrix": matrix, "num_examples": count}

    def _finalize(self, statistics, layout, pass_index):
        count = statistics["num_examples"]
        matrix = statistics["matrix"] / count
        self.matrix_ = 0.5 * (matrix + matrix.T)
        self.num_examples_ = int(count)
        self._clear_cache()

    def _load_state(self, tensors, metadata, layout, model):
        super()._load_state(tensors, metadata, layout, model)
        self._clear_cache()

    def _clear_cache(self) -> None:
        self._cholesky: dict[float, torch.Tensor] = {}
        self._spectrum: tuple[float, float, float] | None = None

    def eigenvalue_summary(self) -> tuple[float, float, float]:
        """Smallest, largest and mean eigenvalue of ``matrix_`` (float64 ``eigvalsh``, cached)."""
        check_is_fitted(self, "matrix_", "eigenvalue_summary()")
        if getattr(self, "_spectrum", None) is None:
            values = torch.linalg.eigvalsh(self.matrix_)
            self._spectrum = (float(values[0]), float(values[-1]), float(values.mean()))
        return self._spectrum

    def _factor(self, damping: float) -> torch.Tensor:
        if damping not in self._cholesky:
            owner = f"Exact({self.curvature_type!r})"
            if not self._well_conditioned(damping):  # the exact test, with its message
                smallest, largest, mean = self.eigenvalue_summary()
                check_conditioning(smallest, largest, damping, owner, self.curvature_type, mean)
            L, info = torch.linalg.cholesky_ex(self._shifted(damping))
            if int(info) != 0:  # passed the eigenvalue test, yet rounding broke the factor
                smallest, largest, _ = self.eigenvalue_summary()
                raise CurvatureError(
                    f"{owner}: the Cholesky factorisation of C + damping·I failed at "
                    f"damping={damping:g} (C's eigenvalues span [{smallest:.3g}, {largest:.3g}]): "
                    "it is too close to singular. Use a larger damping."
                )
            self._cholesky[damping] = L
        return self._cholesky[damping]

    def _shifted(self, shift: float) -> torch.Tensor:
        eye = torch.eye(self.matrix_.shape[0], dtype=torch.float64, device=self.matrix_.device)
        return self.matrix_ + shift * eye

    def _well_conditioned(self, damping: float) -> bool:
        """A cheap proof that ``λ_min(C + λI) > RCOND · λ_max(C + λI)``.

        With ``b = ‖C‖_∞ >= λ_max(C)`` and ``δ = 10 · RCOND · (b + λ)``, a successful Cholesky
        factorisation of ``C + (λ − δ)I`` shows ``λ_min(C + λI) >= δ`` up to its backward
        error (``~P·ε·b``, below ``δ/2`` for ``P <= 20000``), hence the test passes. It costs
        one more factorisation, not an eigendecomposition (``eigvalsh`` is ~10x slower).
        """
        bound = float(self.matrix_.abs().sum(dim=1).max())
        delta = 10 * RCOND * (bound + damping)
        return int(torch.linalg.cholesky_ex(self._shifted(damping - delta))[1]) == 0

    def _solve(self, G, damping):
        L = self._factor(damping)
        X = torch.cholesky_solve(G.T.to(L), L)
        return X.T

    def _matmat(self, V, damping):
        M = self.matrix_
        return V.to(M) @ M + damping * V.to(M)
