"""Guards against silently wrong numbers: non-finite gradients and stochastic models.

:func:`check_finite` names the examples behind NaN/inf gradients or scores (every scoring
path calls it). Influence scores are functions of the model's (deterministic) per-example losses. A model that
is stochastic in its current mode (dropout in ``train()`` mode, ``F.dropout(..., training=True)``
in the forward, an LSTM's inter-layer dropout, attention dropout, sampling) gives different
gradients on every call, so its scores are random numbers. :func:`check_deterministic` computes
the loss of one batch twice and refuses when the two disagree.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .exceptions import NonFiniteGradientError, StochasticModelError
from .tasks import Task


def stochastic_modules(model: nn.Module) -> list[str]:
    """Modules in training mode that randomise their output in that mode (dropout-like)."""
    out = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "dropout", None)
        if isinstance(p, float) and p > 0:
            out.append(f"{name or '<root>'} ({type(m).__name__}, p={p:g})")
    return out


def check_deterministic(model: nn.Module, task: Task, batch: Any, stage: str) -> None:
    """Raises :class:`StochasticModelError` when two identical loss calls on ``batch`` differ.

    The tolerance is ``100 · eps`` of the loss dtype (relative), so GPU reductions that are
    not bit-reproducible pass and dropout of any useful rate does not.
    """
    with torch.no_grad():
        first = task.loss(model, batch)
        second = task.loss(model, batch)
    if not isinstance(first, torch.Tensor) or not first.is_floating_point():
        return
    tol = 100 * torch.finfo(first.dtype).eps
    diff = (first - second).abs()
    scale = torch.maximum(first.abs(), second.abs()).clamp_min(1e-30)
    # A loss that is NaN or inf in both calls is not randomness: it is left to the finite
    # checks downstream (NonFiniteGradientError), which name the examples.
    same_non_finite = (first.isnan() & second.isnan()) | (torch.isinf(first) & (first == second))
    if bool((same_non_finite | (diff <= tol * scale)).all()):
        return
    relative = float((diff / scale).nan_to_num(float("inf")).max())
    modules = stochastic_modules(model)
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    where = (
        f"Modules with dropout active: {', '.join(modules[:6])}{' ...' if len(modules) > 6 else ''}. "
        if modules else
        (f"Modules in training mode: {', '.join(training[:6])}{' ...' if len(training) > 6 else ''}. " if training else "")
    )
    raise StochasticModelError(
        f"The model is stochastic in this mode: the loss of the first {stage} batch differs "
        f"between two identical calls (relative difference {relative:.2g}), so gradients and "
        f"scores would be random. {where}Call model.eval() before fit() and scoring, or disable "
        "dropout / sampling in the forward (e.g. F.dropout(..., training=self.training)). If "
        "the randomness is intended, pass self_check=False to the estimator."
    )


def warn_if_dropout_active(model: nn.Module) -> None:
    """The weaker check kept when ``self_check=False``: a warning naming active dropout."""
    active = stochastic_modules(model)
    if active:
        warnings.warn(
            f"Dropout is active in training mode ({', '.join(active[:5])}): gradients and "
            "scores will be random. Call model.eval() before fitting and scoring.",
            UserWarning,
            stacklevel=4,
        )


def check_finite(G: torch.Tensor, offset: int, what: str) -> None:
    """Raises :class:`NonFiniteGradientError` naming the examples (rows of ``G``, any shape
    ``(n, ...)``) with NaN/inf gradients.

    A NaN or inf entry always makes its row's sum non-finite, so one summing pass (no ``(n, P)``
    mask) clears the usual all-finite case; only when some sum is not finite (which a finite
    row can also reach, by overflowing) are the entries checked one by one.
    """
    if G.dim() == 1:
        G = G[:, None]
    if bool(torch.isfinite(G.sum(dim=tuple(range(1, G.dim())))).all()):
        return
    bad = ~torch.isfinite(G).flatten(1).all(dim=1)
    if bool(bad.any()):
        idx = (torch.nonzero(bad).flatten() + offset).tolist()
        shown = idx[:20] + (["..."] if len(idx) > 20 else [])
        raise NonFiniteGradientError(
            f"NaN or inf gradients for {len(idx)} {what} example(s) at indices {shown}. Check "
            "those examples' inputs and labels, and the model's loss at them (e.g. log(0))."
        )


def unmeasured_examples(task: Task, batch: Any, offset: int, G: torch.Tensor | None = None) -> list[int]:
    """Indices (``offset`` + position) of the batch's examples with nothing measured.

    Those :meth:`Task.measured` reports, and, as a backstop for tasks that cannot tell, those
    whose gradient row in ``G`` (``(B, ...)``, optional) is exactly zero.
    """
    mask = task.measured(batch)
    empty = None if mask is None else ~mask.reshape(-1).bool().cpu()
    if G is not None:
        zero = ~(G.reshape(G.shape[0], -1) != 0).any(dim=1).cpu()
        empty = zero if empty is None else empty | zero
    if empty is None:
        return []
    return (torch.nonzero(empty).flatten() + offset).tolist()


def report_unmeasured(indices: list[int], total: int, what: str, strict: bool) -> None:
    """Raises (``strict`` and all ``total`` examples empty) or warns naming the ``what``
    examples at ``indices`` whose gradient is zero, so that their scores are all zero."""
    if not indices:
        return
    shown = indices[:20] + (["..."] if len(indices) > 20 else [])
    why = (
        "nothing is measured: e.g. a sequence whose labels are all -100 or whose target tokens "
        "are all padding, so its loss is 0 and its gradient exactly zero"
    )
    if strict and len(indices) == total:
        raise ValueError(
            f"All {total} {what} example(s) have a zero gradient ({why}): every score would be 0. "
            "Give each query at least one target token (label other than -100)."
        )
    warnings.warn(
        f"{len(indices)} of {total} {what} example(s) at indices {shown} have a zero gradient "
        f"({why}): their scores are all 0.",
        UserWarning,
        stacklevel=4,
    )
