"""Checks on the model that guard every fit and scoring call against silently random scores.

Influence scores are functions of the model's (deterministic) per-example losses. A model that
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

from .exceptions import StochasticModelError
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
    if bool(torch.isfinite(diff).all()) and bool((diff <= tol * scale).all()):
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
