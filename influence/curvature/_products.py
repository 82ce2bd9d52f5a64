"""Matrix-free curvature products of one batch, batched over many vectors.

For a batch ``{z_b}`` and vectors ``V`` of shape ``(n, P)`` these return ``(Σ_b C_b) Vᵀ``
transposed back to ``(n, P)``, where ``C_b`` is, for ``curvature_type``:

- ``"hessian"``: ``∇²_θ ℓ(z_b)`` (forward-over-reverse: ``jvp(grad(ℓ))``);
- ``"ggn"``: ``J_bᵀ H_b J_b`` with ``J_b = ∂f(z_b)/∂θ`` and ``H_b = ∂²ℓ/∂f²`` (needs an
  :class:`~influence.tasks.OutputTask`); equal to the true Fisher for cross-entropy and
  squared error;
- ``"fisher"``: the empirical Fisher ``∇ℓ(z_b) ∇ℓ(z_b)ᵀ`` with the data's labels.

Sums, not means: callers divide by the number of examples so that statistics can be added
across batches (and across processes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from ..exceptions import InfluenceError
from ..gradients.functional import _TaskCall, per_sample_grads
from ..params import ParameterLayout
from ..tasks import OutputTask, Task

CURVATURE_TYPES = ("hessian", "ggn", "fisher")


def check_curvature_type(curvature_type: str) -> str:
    if curvature_type not in CURVATURE_TYPES:
        raise ValueError(
            f"Invalid curvature_type {curvature_type!r}. Supported: {CURVATURE_TYPES}."
        )
    return curvature_type


def flat_parameters(model: nn.Module, layout: ParameterLayout) -> torch.Tensor:
    """The attributed parameters' current values as one detached flat vector ``(P,)``."""
    return layout.flatten({n: t.detach() for n, t in layout.tensors(model).items()})


def functional(model: nn.Module, layout: ParameterLayout, fn, batch: Any):
    """``flat ↦ fn(model with attributed parameters = flat, batch)``, for torch.func."""
    bound = _TaskCall(model, fn)
    prefixed = ["model." + n for n in layout.names]

    def call(flat: torch.Tensor):
        params = dict(zip(prefixed, layout.unflatten(flat).values()))
        return functional_call(bound, params, (batch,), strict=False)

    return call


def batch_matmat(
    curvature_type: str,
    model: nn.Module,
    task: Task,
    layout: ParameterLayout,
    batch: Any,
    V: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``(Σ_b C_b) v`` for every row ``v`` of ``V`` (``(n, P)`` in, ``(n, P)`` out).

    Runs under ``torch.no_grad``: the torch.func transforms still differentiate, and no autograd
    graph is kept through parameters outside the layout.
    """
    with torch.no_grad():
        return _batch_matmat(curvature_type, model, task, layout, batch, V, chunk_size)


def _batch_matmat(curvature_type, model, task, layout, batch, V, chunk_size):
    check_curvature_type(curvature_type)
    theta = flat_parameters(model, layout)
    V = V.to(theta.dtype)
    if curvature_type == "fisher":
        G = per_sample_grads(model, task, batch, layout)
        return (V @ G.T) @ G
    if curvature_type == "hessian":
        total = functional(model, layout, lambda m, b: task.loss(m, b).sum(), batch)
        gradient = grad(total)

        def hvp(v):
            return jvp(gradient, (theta,), (v,))[1]

        return vmap(hvp, chunk_size=chunk_size)(V)
    if not isinstance(task, OutputTask):
        raise InfluenceError(
            f"curvature_type='ggn' needs a task that separates model outputs from the loss "
            f"(an OutputTask such as ClassificationTask); {type(task).__name__} does not. "
            "Use curvature_type='hessian' or 'fisher', or subclass OutputTask."
        )
    forward = functional(model, layout, task.forward, batch)
    targets = task.targets(batch)
    outputs, pullback = vjp(forward, theta)
    output_grad = grad(lambda o: task.output_loss(o, targets, batch).sum())
    outputs = outputs.detach()

    def ggnvp(v):
        jv = jvp(forward, (theta,), (v,))[1]
        hjv = jvp(output_grad, (outputs,), (jv,))[1]
        return pullback(hjv)[0]

    return vmap(ggnvp, chunk_size=chunk_size)(V)
