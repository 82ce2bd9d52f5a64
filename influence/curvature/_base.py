"""The :class:`Curvature` protocol: ``fit`` once, then ``solve`` and ``matmat`` cheaply.

A curvature approximates ``C``, a curvature matrix (Hessian, Gauss-Newton or Fisher) of the
**mean** training loss ``(1/N) Σ_j ℓ(z_j)`` over the attributed parameters, and applies
``(C + λI)⁻¹`` (``solve``) or ``C + λI`` (``matmat``) to the rows of ``(n, P)`` matrices.
Damping ``λ`` is applied at solve time, so changing it needs no refit.

Public methods validate (fitted state, shape, dtype, device, damping) and call the private
hooks ``_fit``, ``_solve`` and ``_matmat`` that subclasses implement. Fitted state ends in
``_``. A new curvature is one file and one line in :data:`influence.curvature.CURVATURES`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Iterable

import torch
from torch import nn

from .._params_base import ParamsMixin, check_is_fitted
from ..exceptions import InfluenceError, NonFiniteGradientError
from ..params import ParameterLayout, ParamSpec, select_parameters
from ..tasks import Task


def check_damping(damping: Any, owner: str) -> float:
    """Validates a damping value (a finite float ``>= 0``)."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"{owner}: damping must be a float >= 0; got {damping!r}.")
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"{owner}: damping must be a finite float >= 0; got {damping!r}.")
    return float(damping)


def check_instance(obj: Any, kind: type, argument: str) -> None:
    """Catches the common slip of passing a class instead of an instance."""
    if isinstance(obj, type) and issubclass(obj, kind):
        raise TypeError(
            f"{argument} must be an instance, got the class {obj.__name__}: write "
            f"{obj.__name__}(...) with parentheses."
        )
    if not isinstance(obj, kind):
        raise TypeError(
            f"{argument} must be a {kind.__name__} instance; got {type(obj).__name__}."
        )


class Curvature(ParamsMixin, ABC):
    """Base class of curvature approximations.

    Args:
        damping: ``λ`` added to the curvature's diagonal at solve time.
    """

    def __init__(self, damping: float = 1e-3):
        self.damping = damping

    # ----------------------------------------------------------------------------- public API
    def fit(
        self,
        model: nn.Module,
        task: Task,
        loader: Iterable[Any],
        params: ParamSpec = "trainable",
    ) -> "Curvature":
        """Computes everything that depends only on the model and the training data.

        Args:
            model: the trained model (put it in eval mode).
            task: reads the loader's batches.
            loader: the training batches (any iterable).
            params: the attributed parameters (see :func:`influence.params.select_parameters`).

        Returns:
            self, fitted; a previous fit is discarded.
        """
        check_instance(task, Task, "task")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        check_damping(self.damping, type(self).__name__)
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, key)
        layout = select_parameters(model, params)
        self._fit(model, task, loader, layout)
        self.layout_ = layout
        return self

    def solve(self, G: torch.Tensor, damping: float | None = None) -> torch.Tensor:
        """Returns ``(C + λI)⁻¹`` applied to each row of ``G`` (``(n, P)`` → ``(n, P)``)."""
        check_is_fitted(self, "layout_", "solve()")
        G = self._check_rows(G, "G")
        lam = self._damping(damping)
        return self._solve(G, lam).to(G.dtype)

    def matmat(self, V: torch.Tensor, damping: float | None = None) -> torch.Tensor:
        """Returns ``(C + λI)`` applied to each row of ``V`` (``(n, P)`` → ``(n, P)``)."""
        check_is_fitted(self, "layout_", "matmat()")
        V = self._check_rows(V, "V")
        lam = self._damping(damping)
        return self._matmat(V, lam).to(V.dtype)

    def residual(self, G: torch.Tensor, damping: float | None = None) -> torch.Tensor:
        """Relative residual ``‖(C+λI) x − g‖ / ‖g‖`` of ``x = solve(g)``, one value per row.

        This is the iHVP error the curvature itself can see; 0 for exact solvers. Rows with
        ``g = 0`` report 0.
        """
        X = self.solve(G, damping)
        R = self.matmat(X, damping) - G
        norms = G.norm(dim=1)
        return torch.where(norms > 0, R.norm(dim=1) / norms.clamp_min(1e-300), torch.zeros_like(norms))

    @property
    def num_params_(self) -> int:
        check_is_fitted(self, "layout_", "num_params_")
        return self.layout_.num_params

    # ----------------------------------------------------------------------------- hooks
    @abstractmethod
    def _fit(self, model: nn.Module, task: Task, loader: Iterable[Any], layout: ParameterLayout) -> None:
        """Computes the fitted state (attributes ending in ``_``)."""

    @abstractmethod
    def _solve(self, G: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C + damping·I)⁻¹`` on the rows of validated ``G``."""

    @abstractmethod
    def _matmat(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C + damping·I)`` on the rows of validated ``V``."""

    # ----------------------------------------------------------------------------- checks
    def _damping(self, damping: float | None) -> float:
        return check_damping(self.damping if damping is None else damping, type(self).__name__)

    def _check_rows(self, G: Any, name: str) -> torch.Tensor:
        if not isinstance(G, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (n, P); got {type(G).__name__}.")
        P = self.layout_.num_params
        if G.dim() == 1 and G.shape[0] == P:
            raise ValueError(
                f"{name} must be 2-D (n, {P}), batch first; got a vector of shape {tuple(G.shape)}. "
                f"Use {name}[None] for a single row."
            )
        if G.dim() != 2 or G.shape[1] != P:
            raise ValueError(
                f"{name} must have shape (n, {P}) ({P} = attributed parameters); got "
                f"{tuple(G.shape)}."
            )
        if not G.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {G.dtype}.")
        return G


def check_finite_statistics(
    values: torch.Tensor, model: nn.Module, task: Task, batch: Any, layout: ParameterLayout, offset: int
) -> None:
    """Raises :class:`NonFiniteGradientError` naming the training examples behind NaN/inf.

    ``values`` are curvature statistics of one batch starting at global index ``offset``;
    they are checked cheaply, and only on failure are the batch's per-example gradients
    computed to find the offending examples.
    """
    if bool(torch.isfinite(values).all()):
        return
    from ..gradients.functional import per_sample_grads

    G = per_sample_grads(model, task, batch, layout)
    bad = (~torch.isfinite(G).all(dim=1)).nonzero().flatten()
    where = (
        f"at indices {(bad + offset).tolist()[:20]}"
        if bad.numel()
        else f"in the batch of examples {offset}..{offset + G.shape[0] - 1} (gradients are finite; the second-order terms are not)"
    )
    raise NonFiniteGradientError(
        f"NaN or inf curvature statistics from {max(bad.numel(), 1)} train example(s) {where}. "
        "Check those examples' inputs and labels, and the model's loss at them (e.g. log(0))."
    )
