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
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from .._params_base import ParamsMixin, check_is_fitted
from ..exceptions import CurvatureError, NonFiniteGradientError
from ..params import ParameterLayout, ParamSpec, select_parameters
from ..tasks import Task


def check_damping(damping: Any, owner: str) -> float:
    """Validates a damping value (a finite float ``>= 0``)."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"{owner}: damping must be a float >= 0; got {damping!r}.")
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"{owner}: damping must be a finite float >= 0; got {damping!r}.")
    return float(damping)


#: ``C + λI`` counts as singular when its smallest eigenvalue is at most this fraction of its
#: largest. The spectra are computed in float64, where an eigenvalue below ~``n·ε₆₄·λ_max``
#: (``ε₆₄ ≈ 2.2e-16``, ``n`` up to a few thousand) cannot be told apart from zero, and a solve
#: with such a condition number amplifies the rounding of its input (``ε₃₂ ≈ 6e-8`` for float32
#: gradients) by over ``10¹²`` in the weakest directions. The threshold does not depend on the
#: gradients' dtype: in a score ``∇mᵀ x`` the amplified rounding meets the training gradient's
#: own rounding in those directions, so float32 scores stay accurate to about
#: ``ε₃₂² / RCOND ≈ 4e-3`` at worst (measured: 5e-5 relative to float64 for K-FAC and EK-FAC at
#: ``damping = 2e-12 × λ_max`` on the singular MLP of tests/test_numerics_guards.py).
RCOND = 1e-12


def check_conditioning(
    smallest: float,
    largest: float,
    damping: float,
    owner: str,
    curvature_type: str = "fisher",
    mean: float | None = None,
) -> None:
    """Raises :class:`CurvatureError` when ``C + λI`` is not safely invertible.

    Args:
        smallest, largest: the extreme eigenvalues of the **undamped** ``C``.
        damping: ``λ``, added here.
        owner: names the curvature in the message (e.g. ``"EKFAC"``).
        curvature_type: ``"hessian"`` (may be indefinite: a negative eigenvalue is reported as
            such, with the advice to use the Gauss-Newton) or a positive semi-definite type
            (``"ggn"``, ``"fisher"``: a negative ``smallest`` is rounding on a singular ``C``).
        mean: the mean eigenvalue ``trace(C)/P``; the message then suggests ``0.1 × mean``,
            the damping heuristic of kronfluence and of DataInf.

    The test is ``λ_min + λ <= RCOND · (λ_max + λ)`` (:data:`RCOND` ``= 1e-12``); the message
    gives the smallest damping that passes it.

    Examples:
        >>> check_conditioning(0.5, 2.0, 0.0, "Demo")  # well conditioned: returns None
        >>> check_conditioning(0.0, 2.0, 0.0, "Demo")
        Traceback (most recent call last):
        ...
        influence.exceptions.CurvatureError: Demo: C + damping·I at damping=0 is singular: its smallest eigenvalue is 0. Use damping > 2e-12 (larger values are more stable).
    """
    low, high = smallest + damping, largest + damping
    if low > RCOND * high:
        return
    if not (math.isfinite(low) and math.isfinite(high)):
        raise CurvatureError(
            f"{owner}: the fitted curvature has non-finite eigenvalues ({smallest}, {largest}). "
            "Fit it again on finite data."
        )
    needed = max((RCOND * largest - smallest) / (1 - RCOND), 0.0)
    if high <= 0 and low >= 0:
        state = "is zero: there is nothing to invert"
    elif low < 0 and curvature_type == "hessian":
        state = f"is not positive definite: C's smallest eigenvalue is {smallest:.3g}"
    elif low < 0:
        state = (
            f"is singular: C's smallest eigenvalue is {smallest:.3g}, and as the "
            f"{curvature_type} is positive semi-definite, that is rounding on a singular matrix"
        )
    elif low == 0:
        state = "is singular: its smallest eigenvalue is 0"
    else:
        state = (
            f"is numerically singular: its smallest eigenvalue {low:.3g} is at most "
            f"{RCOND:g} x its largest {high:.3g}, so a solve would amplify rounding errors "
            f"by over {1 / RCOND:.0e}"
        )
    advice = f"Use damping > {needed:.2g} (larger values are more stable"
    if mean is not None and 0.1 * mean > needed:
        advice += f"; 0.1 x the mean eigenvalue, {0.1 * mean:.2g}, is a common choice"
    advice += ")"
    if curvature_type == "hessian" and low < 0:
        advice += ", or curvature_type='ggn' (always positive semi-definite)"
    raise CurvatureError(f"{owner}: C + damping·I at damping={damping:g} {state}. {advice}.")


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

    ``fit(model, task, loader, params)`` does everything that depends only on the model and the
    training data; ``solve(G)`` applies ``(C + λI)⁻¹`` to the rows of ``G`` (``(n, P)``) and
    ``matmat(V)`` applies ``C + λI``. A new curvature subclasses this, implements the private
    hooks ``_fit``, ``_solve`` and ``_matmat``, and is added to :data:`CURVATURES`.

    Args:
        damping: ``λ`` added to the curvature's diagonal at solve time.

    Examples:
        Every curvature, used directly (the estimator does this for you):

        >>> import torch, influence
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))]
        >>> cur = influence.KFAC(damping=0.1).fit(model, influence.ClassificationTask(), data)
        >>> isinstance(cur, influence.Curvature), cur.num_params_
        (True, 8)
        >>> V = torch.randn(4, 8, dtype=torch.float64)
        >>> torch.allclose(cur.solve(cur.matmat(V)), V)
        True
    """

    #: Relative tolerance of ``solve(matmat(V)) ≈ V`` that the generic conformance tests
    #: (tests/test_curvature_conformance.py) allow, and constructor keywords they use on top of
    #: the defaults; stochastic or approximate curvatures declare looser values.
    conformance_rtol: ClassVar[float] = 1e-6
    conformance_params: ClassVar[dict[str, Any]] = {}

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
        self._damping(None)
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

        The product uses :meth:`_exact_matmat`: the true ``C + λI`` (matrix-free for the
        iterative and approximate curvatures), not the approximation being solved, so this is
        the iHVP error of the solution (0 up to rounding for exact solvers). Rows with
        ``g = 0`` report 0.
        """
        X = self.solve(G, damping)
        R = self._exact_matmat(X, self._damping(damping)).to(G.dtype) - G
        norms = G.norm(dim=1)
        return torch.where(norms > 0, R.norm(dim=1) / norms.clamp_min(1e-300), torch.zeros_like(norms))

    @property
    def num_params_(self) -> int:
        check_is_fitted(self, "layout_", "num_params_")
        return self.layout_.num_params

    # ----------------------------------------------------------------------------- hooks
    def _fit(self, model: nn.Module, task: Task, loader: Iterable[Any], layout: ParameterLayout) -> None:
        """Computes the fitted state (attributes ending in ``_``).

        The default runs the statistics protocol below (sharded across ranks, checkpointed,
        with a progress bar); a curvature that does not implement the protocol overrides
        ``_fit`` instead (then under ``torch.distributed`` every rank fits on the full loader).
        """
        from .._fitting import fit_statistics

        fit_statistics(self, model, task, loader, layout)

    # ----------------------------------------------------------------------------- statistics
    # The statistics protocol makes a fit data-parallel and resumable with no code of its own.
    # A fit is ``_num_passes`` passes over the training loader. In pass ``p``,
    # ``_batch_statistics(..., p)`` returns a dict of tensors that are **sums over the batch's
    # examples** (the example count included, e.g. ``"num_examples"``); the driver adds them
    # over the batches (and, under torch.distributed, over the ranks with one all-reduce) and
    # calls ``_finalize(totals, layout, p)``, which divides by the counts and sets the fitted
    # state (a later pass may use the state set by an earlier one). Examples:
    #
    # - Exact: ``{"matrix": Σ_j C_j, "num_examples": N}``;
    # - Diagonal: ``{"diagonal/sum": Σ_j g_j², "diagonal/count": N}``;
    # - K-FAC: per layer ``{"<layer>/A": Σ a aᵀ, "<layer>/S": Σ s sᵀ, "<layer>/A_count", ...}``,
    #   finalised into covariances and eigendecompositions;
    # - EK-FAC: pass 0 as K-FAC; pass 1 sums the squared eigenbasis projections of the
    #   per-example gradients (``"<layer>/corrections"``, the corrected eigenvalues);
    # - CG/LiSSA/Arnoldi/DataInf keep their ``_fit``; their CurvatureOperator sums each product
    #   over the rank's shard and all-reduces it with :func:`influence.distributed.all_reduce_sum`
    #   (sum of the shard products and counts, then divide; see curvature/_operator.py).
    _num_passes: int = 1

    def _batch_statistics(
        self, model: nn.Module, task: Task, batch: Any, layout: ParameterLayout, pass_index: int
    ) -> dict[str, torch.Tensor]:
        """Sums over the batch's examples of everything the fit needs (see above)."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither _fit nor the statistics protocol "
            "(_batch_statistics and _finalize)."
        )

    def _draws_per_example(self) -> bool:
        """True when the fit draws random numbers keyed by each example's global index
        (true-Fisher targets): the driver then passes global indices to :meth:`_begin_batch`,
        counting the examples of the ranks before this one."""
        return False

    def _begin_batch(self, pass_index: int, example_offset: int) -> None:
        """Called by the fit driver before each batch's statistics with the index of the
        batch's first example: its global position in the training loader (all ranks
        counted) when :meth:`_draws_per_example`, else its position in this rank's shard. A
        curvature that samples keys its draws on ``_example_offset + b`` for the batch's
        example ``b`` (:class:`~influence.draws.TargetDraws`), so they depend neither on the
        batching, nor on the number of processes, nor on where a resumed fit restarted."""
        self._example_offset = example_offset

    def _finalize(self, statistics: dict[str, torch.Tensor], layout: ParameterLayout, pass_index: int) -> None:
        """Sets the fitted state from the statistics summed over all batches (and ranks)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _finalize.")

    @classmethod
    def _uses_statistics(cls) -> bool:
        """True when the curvature fits through the statistics protocol."""
        return cls._batch_statistics is not Curvature._batch_statistics

    # ----------------------------------------------------------------------------- state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as named tensors, for :meth:`InfluenceEstimator.save`.

        The default exports every public fitted attribute (ending in ``_``) that is a tensor,
        or a dict of tensors (as ``"attr/key"``); other fitted values go to
        :meth:`_state_metadata`. Override both with :meth:`_load_state` for other layouts.
        """
        out: dict[str, torch.Tensor] = {}
        for key, value in self._fitted_items():
            if isinstance(value, torch.Tensor):
                out[key] = value
            elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                out.update({f"{key}/{k}": v for k, v in value.items()})
        return out

    def _state_metadata(self) -> dict[str, Any]:
        """The fitted values that are not tensors (JSON-able scalars, strings, lists)."""
        out: dict[str, Any] = {"dict_keys": []}
        for key, value in self._fitted_items():
            if isinstance(value, torch.Tensor):
                continue
            if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                out["dict_keys"].append(key)
            elif value is None or isinstance(value, (bool, int, float, str)) or _is_json(value):
                out[key] = value
            else:
                raise NotImplementedError(
                    f"{type(self).__name__}.{key} is a {type(value).__name__}: override "
                    "_state_tensors, _state_metadata and _load_state to save this curvature."
                )
        return out

    def _load_state(
        self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], layout: ParameterLayout, model: nn.Module
    ) -> None:
        """Restores the state exported by :meth:`_state_tensors` and :meth:`_state_metadata`.

        ``model`` is the (verified) model the state was fitted on, for curvatures whose state
        refers to its modules: e.g. K-FAC saves its ``statistics_`` sums and rebuilds its
        blocks from them and the layers it plans from ``model`` and ``layout`` here.
        """
        dict_keys = set(metadata.get("dict_keys", []))
        names = dict_keys | {n.partition("/")[0] for n in tensors} | (set(metadata) - {"dict_keys"})
        for key in sorted(names):  # the file is untrusted: it sets fitted attributes only
            if not (key.isidentifier() and key.endswith("_") and not key.startswith("_")):
                raise ValueError(f"the saved state names {key!r}, not a fitted attribute (public, ending in '_')")
        for key in dict_keys:
            setattr(self, key, {})
        for name, tensor in tensors.items():
            key, _, sub = name.partition("/")
            if key in dict_keys:
                getattr(self, key)[sub] = tensor
            else:
                setattr(self, key, tensor)
        for key, value in metadata.items():
            if key != "dict_keys":
                setattr(self, key, value)
        self.layout_ = layout

    def _fitted_items(self) -> list[tuple[str, Any]]:
        return [
            (k, v) for k, v in vars(self).items()
            if k.endswith("_") and not k.startswith("_") and k != "layout_"
        ]

    @abstractmethod
    def _solve(self, G: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C + damping·I)⁻¹`` on the rows of validated ``G``."""

    @abstractmethod
    def _matmat(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C + damping·I)`` on the rows of validated ``V``."""

    def _exact_matmat(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """The true ``(C + damping·I)`` on rows of ``V``, for :meth:`residual`.

        Defaults to :meth:`_matmat`; curvatures whose ``_matmat`` applies their own
        approximation override it with the exact (e.g. matrix-free) product.
        """
        return self._matmat(V, damping)

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


def _is_json(value: Any) -> bool:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def check_finite_statistics(
    values: torch.Tensor, model: nn.Module, task: Task, batch: Any, layout: ParameterLayout, offset: int
) -> None:
    """Raises :class:`NonFiniteGradientError` naming the training examples behind NaN/inf.

    ``values`` are curvature statistics of one batch starting at global index ``offset``;
    they are checked cheaply, and only on failure are the batch's per-example gradients
    computed to find the offending examples.
    """
    if bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all()):
        return  # a finite sum (one cheap pass) proves all finite; only overflow needs the second test
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
