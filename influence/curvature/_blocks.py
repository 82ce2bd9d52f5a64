"""Block-diagonal curvatures: each parameter belongs to exactly one block.

A fitted :class:`BlockCurvature` holds ``blocks_``, a list of blocks that each own some
coordinates of the flat ``(n, P)`` rows and apply ``(C_b + λI)`` or its inverse to them:
Kronecker blocks (``KFAC``/``EKFAC`` layers), :class:`DiagonalBlock` (a per-parameter Fisher
diagonal) and :class:`IdentityBlock` (``C_b = 0``). Coupling between blocks is dropped.

It also builds ``coverage_``, the record of which method covers which module, so that no
parameter is silently dropped: ``{module: {"method", "parameters", "num_params"}}``, every
attributed parameter listed exactly once.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from .._params_base import check_is_fitted
from ..exceptions import FallbackWarning
from ..params import ParameterLayout, module_name
from ._base import Curvature, check_conditioning

FALLBACK_METHODS = ("diagonal", "identity")


def index_of(layout: ParameterLayout, names: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Flat coordinates of the named parameters, in the given order."""
    slices = layout.slices()
    if not names:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


class DiagonalBlock:
    """``C_b = diag(d)`` on coordinates ``index``; ``d`` is a Fisher diagonal (``>= 0``).

    Like every block it exposes ``eigenvalues``, the spectrum of ``C_b`` (here ``d``).
    """

    method = "diagonal"

    def __init__(self, names: tuple[str, ...], index: torch.Tensor, diagonal: torch.Tensor):
        self.names = names
        self.index = index
        self.diagonal = diagonal

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.diagonal

    def apply(self, X: torch.Tensor, out: torch.Tensor, damping: float, inverse: bool) -> None:
        idx = self.index.to(X.device)
        d = self.diagonal.to(X) + damping
        out[:, idx] = X[:, idx] / d if inverse else X[:, idx] * d


class IdentityBlock(DiagonalBlock):
    """``C_b = 0``: the block contributes ``λI`` only (gradient dot products, scaled)."""

    method = "identity"

    def __init__(self, names: tuple[str, ...], index: torch.Tensor):
        super().__init__(names, index, torch.zeros(index.numel(), dtype=torch.float64))


def resolve_fallback(owner: str, fallback: Any, names: list[str]) -> dict[str, str]:
    """Maps each parameter to ``"diagonal"`` or ``"identity"`` following ``fallback``.

    ``fallback`` is a method name for all, or ``{glob pattern: method}`` matched in order
    against parameter names and module names; unmatched parameters get ``"diagonal"``.
    """
    if isinstance(fallback, str):
        rules = {"*": fallback}
    elif isinstance(fallback, Mapping):
        rules = dict(fallback)
    else:
        raise TypeError(
            f"{owner}: fallback must be one of {FALLBACK_METHODS} or a dict "
            f"{{pattern: method}}; got {type(fallback).__name__}."
        )
    for pattern, method in rules.items():
        if method not in FALLBACK_METHODS:
            raise ValueError(
                f"{owner}: invalid fallback method {method!r} for pattern {pattern!r}. "
                f"Supported: {FALLBACK_METHODS}."
            )
    chosen = {}
    for name in names:
        method = next(
            (
                m
                for pat, m in rules.items()
                if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(module_name(name), pat)
            ),
            "diagonal",
        )
        chosen[name] = method
    return chosen


def coverage_report(
    layout: ParameterLayout, methods: Mapping[str, str], reasons: Mapping[str, str] = {}
) -> dict[str, dict]:
    """``{module: {"method", "parameters", "num_params"}}`` with every parameter once, plus
    ``"reason"`` where ``reasons`` says why a module is not covered as its kind would be.

    Parameters of one module covered by different methods are listed under their own names.
    """
    numels = dict(zip(layout.names, layout.numels))
    by_module: dict[str, list[str]] = {}
    for name in layout.names:
        by_module.setdefault(module_name(name), []).append(name)
    report: dict[str, dict] = {}
    for module, names in by_module.items():
        if len({methods[n] for n in names}) == 1:
            groups = {module: names}
        else:
            groups = {n: [n] for n in names}
        for key, group in groups.items():
            report[key] = {
                "method": methods[group[0]],
                "parameters": tuple(group),
                "num_params": sum(numels[n] for n in group),
            }
            if module in reasons:
                report[key]["reason"] = reasons[module]
    return report


def warn_fallback(
    owner: str, model: nn.Module, report: Mapping[str, dict], reasons: Mapping[str, str] = {}
) -> None:
    """One :class:`FallbackWarning` listing every module not covered by a Kronecker block."""
    from ..gradients.capture import unsupported_reason

    fell = {k: v for k, v in report.items() if v["method"] in FALLBACK_METHODS}
    if not fell:
        return
    modules = dict(model.named_modules())
    parts = []
    for key, entry in fell.items():
        module = modules.get(key)
        kind = type(module).__name__ if module is not None else "parameter"
        reason = reasons.get(key) or (unsupported_reason(module) if module is not None else None)
        why = f", {reason}" if reason else ""
        parts.append(f"{key or '<root>'} ({kind}{why}, {entry['num_params']} params) -> {entry['method']}")
    warnings.warn(
        f"{owner}: {len(fell)} module(s) have no Kronecker block (K-FAC covers Linear/Conv2d/"
        "Embedding/HF Conv1D layers with all their parameters attributed, each used only by its "
        f"own forward) and fall back: {'; '.join(parts)}. Choose with "
        "fallback='diagonal'|'identity' or {pattern: method}; see coverage_.",
        FallbackWarning,
        stacklevel=4,
    )


class BlockCurvature(Curvature):
    """Shared ``_solve``/``_matmat`` of block-diagonal curvatures (abstract).

    Subclasses set ``blocks_`` and ``coverage_`` in ``_fit``. Eigenbases and diagonals are
    float64; products run in the vectors' precision (float32 or float64; lower ones in float32).
    Their fitted state is ``statistics_`` (float64 sums and counts): that is what
    :meth:`InfluenceEstimator.save` stores, and ``_restore`` rebuilds the blocks from it (and
    the model, for the layers) on load, with the same code as the fit.
    """

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"statistics_/{k}": v for k, v in self.statistics_.items()}

    def _state_metadata(self) -> dict[str, Any]:
        return {}

    def _load_state(self, tensors, metadata, layout, model) -> None:
        prefix = "statistics_/"
        statistics = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self._restore(statistics, layout, model)
        self.layout_ = layout

    def _restore(self, statistics: dict[str, torch.Tensor], layout: ParameterLayout, model: nn.Module) -> None:
        """Sets the fitted state from saved ``statistics_`` (see :meth:`_load_state`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _restore.")

    def eigenvalue_summary(self) -> tuple[float, float, float]:
        """Smallest, largest and mean eigenvalue of the (undamped) block-diagonal ``C``."""
        check_is_fitted(self, "blocks_", "eigenvalue_summary()")
        spectra = [b.eigenvalues for b in self.blocks_ if b.eigenvalues.numel()]
        if not spectra:
            return 0.0, 0.0, 0.0
        summary = torch.stack([torch.stack([s.min(), s.max(), s.sum()]).double() for s in spectra])
        count = sum(s.numel() for s in spectra)
        return float(summary[:, 0].min()), float(summary[:, 1].max()), float(summary[:, 2].sum()) / count

    def _apply(self, X: torch.Tensor, damping: float, inverse: bool) -> torch.Tensor:
        if inverse:  # relative to the whole spectrum: blocks are solved in one product
            smallest, largest, mean = self.eigenvalue_summary()
            check_conditioning(smallest, largest, damping, type(self).__name__, "fisher", mean)
        # products in the vectors' precision (float64 stays float64; lower precisions run in
        # float32): the eigenbases are float64, but rotating a float32 gradient in float64
        # gains nothing over the rounding already in it and costs ~2x on CPU, far more on GPUs
        X = X if X.dtype in (torch.float32, torch.float64) else X.float()
        out = torch.empty_like(X)
        for block in self.blocks_:
            block.apply(X, out, damping, inverse)
        return out

    def _solve(self, G, damping):
        return self._apply(G, damping, inverse=True)

    def _matmat(self, V, damping):
        return self._apply(V, damping, inverse=False)
