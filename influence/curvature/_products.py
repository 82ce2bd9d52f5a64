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

import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from ..exceptions import CurvatureError, FallbackWarning, InfluenceError
from ..gradients._transforms import (
    first_sentence,
    batching_rule_warnings,
    explain_failure,
    transform_kernels,
)
from ..gradients.functional import OUTSIDE_MODULES, _failing_module, _TaskCall, per_sample_grads
from ..params import ParameterLayout
from ..tasks import OutputTask, Task

CURVATURE_TYPES = ("hessian", "ggn", "fisher")

# Models on which forward-mode AD failed once: their products use reverse-over-reverse autograd.
_REVERSE_MODELS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def check_curvature_type(curvature_type: str, task: Task | None = None) -> str:
    """Validates ``curvature_type`` and, given a task, that the task can form it."""
    if curvature_type not in CURVATURE_TYPES:
        raise ValueError(
            f"Invalid curvature_type {curvature_type!r}. Supported: {CURVATURE_TYPES}."
        )
    if curvature_type == "ggn" and task is not None and not isinstance(task, OutputTask):
        raise InfluenceError(
            f"curvature_type='ggn' (the default of CG, LiSSA, Arnoldi and Exact) needs a task "
            f"that separates model outputs from the loss (an OutputTask such as "
            f"ClassificationTask); {type(task).__name__} does not. Subclass OutputTask, or pass "
            "curvature_type='hessian' or 'fisher'."
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

    Runs under ``torch.no_grad`` (the transforms still differentiate, and no autograd graph is
    kept through parameters outside the layout) and under
    :func:`~influence.gradients._transforms.transform_kernels` (math attention, no MHA fast
    path, no oneDNN RNNs), so that forward-mode AD runs through stock attention and LSTMs.
    Should forward-mode AD still fail on the model (an operation without a forward-AD
    formula, a custom ``autograd.Function`` without ``jvp``, ...), the products are computed by
    reverse-over-reverse autograd instead (:func:`_reverse_over_reverse`: the same numbers, a
    loop over the rows of ``V``), for this model from then on, with one
    :class:`~influence.FallbackWarning`.

    Raises:
        CurvatureError: when neither mode can differentiate the model twice (names the module,
            the reason and the fix).
    """
    check_curvature_type(curvature_type, task)
    if curvature_type == "fisher":
        with torch.no_grad():
            theta = flat_parameters(model, layout)
            G = per_sample_grads(model, task, batch, layout)
            return (V.to(theta.dtype) @ G.T) @ G
    args = (curvature_type, model, task, layout, batch, V)
    with torch.no_grad(), transform_kernels(model):
        if model in _REVERSE_MODELS:
            return _reverse_over_reverse(*args)
        try:
            with batching_rule_warnings(model, "curvature-vector products"):
                return _forward_over_reverse(*args, chunk_size)
        except (InfluenceError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as error:  # forward-mode AD cannot run this model
            forward_error = error
        with batching_rule_warnings(model, "curvature-vector products"):
            where = _failing_module(model, lambda: _forward_over_reverse(*args, chunk_size))
        where = (
            "outside any module's forward (in the task's code or the backward pass)"
            if where == OUTSIDE_MODULES else f"in module {where}"
        )
        reason, fix = explain_failure(model, forward_error)
        try:
            out = _reverse_over_reverse(*args)
            _check_symmetric(curvature_type, model, task, layout, batch)
        except (InfluenceError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as error:
            if type(error) is type(forward_error) and str(error) == str(forward_error):
                raise  # the same failure in both modes: not about differentiation
            detail = str(error) if isinstance(error, _NotSymmetric) else (
                f"{type(error).__name__}: {first_sentence(str(error))}"
            )
            raise CurvatureError(
                f"Cannot compute {curvature_type!r}-vector products on this "
                f"{type(model).__name__}: forward-mode AD (torch.func.jvp) fails {where} "
                f"because {reason}, and reverse-over-reverse autograd (double backward) "
                f"fails too ({detail}). Fix: "
                + (f"{fix}; or " if fix else "")
                + "use curvature_type='fisher' (first-order gradients only) or a Kronecker "
                "curvature (KFAC, EKFAC)."
            ) from error
    _REVERSE_MODELS[model] = where
    warnings.warn(
        f"Curvature-vector products of this {type(model).__name__} use reverse-over-reverse "
        f"autograd (double backward, one vector at a time): forward-mode AD (torch.func.jvp) "
        f"fails {where} because {reason}. Results are the same, only slower."
        + (f" To use forward mode: {fix}." if fix else "")
        + " (Reported once per model.)",
        FallbackWarning,
        stacklevel=3,
    )
    return out


def _forward_over_reverse(curvature_type, model, task, layout, batch, V, chunk_size):
    """Products by torch.func: ``jvp(grad ℓ)`` (Hessian) or ``vjp ∘ jvp(∇_o ℓ) ∘ jvp(f)`` (GGN),
    vmapped over the rows of ``V``."""
    theta = flat_parameters(model, layout)
    V = V.to(theta.dtype)
    if curvature_type == "hessian":
        total = functional(model, layout, lambda m, b: task.loss(m, b).sum(), batch)
        gradient = grad(total)

        def hvp(v):
            return jvp(gradient, (theta,), (v,))[1]

        return vmap(hvp, chunk_size=chunk_size)(V)
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


def _reverse_over_reverse(curvature_type, model, task, layout, batch, V):
    """The same products by plain autograd, reverse mode only, one row of ``V`` at a time.

    Hessian: ``H v = ∇_θ ⟨∇_θ ℓ, v⟩`` (double backward). GGN: with ``f`` the outputs and a
    dummy ``u`` shaped like them, ``Jᵀu = ∇_θ ⟨f, u⟩`` is linear in ``u``, so
    ``J v = ∇_u ⟨Jᵀu, v⟩`` (the "double-vjp trick", valid at any ``u``); then
    ``H_out J v = ∇_f ⟨∇_f ℓ, J v⟩`` and ``Jᵀ(H_out J v)`` by one more vjp. The forward pass
    and the first backward are shared by all rows.
    """
    theta = flat_parameters(model, layout).requires_grad_(True)
    V = V.to(theta.dtype)
    out = torch.zeros_like(V)
    with torch.enable_grad():
        if curvature_type == "hessian":
            total = functional(model, layout, lambda m, b: task.loss(m, b).sum(), batch)(theta)
            gradient = _pull(total, theta, None, create_graph=True)
            for i, v in enumerate(V):
                out[i] = _pull(gradient, theta, v)
            return out
        outputs = functional(model, layout, task.forward, batch)(theta)
        u = torch.zeros_like(outputs, requires_grad=True)
        pulled = _pull(outputs, theta, u, create_graph=True)  # Jᵀu
        frozen = outputs.detach().requires_grad_(True)
        loss = task.output_loss(frozen, task.targets(batch), batch).sum()
        output_grad = _pull(loss, frozen, None, create_graph=True)
        for i, v in enumerate(V):
            jv = _pull(pulled, u, v)
            out[i] = _pull(outputs, theta, _pull(output_grad, frozen, jv))
    return out


class _NotSymmetric(RuntimeError):
    """Double backward dropped part of the graph (a backward that is not differentiable)."""


def _check_symmetric(curvature_type, model, task, layout, batch) -> None:
    """Raises ``_NotSymmetric`` unless ``vᵀ(C w) = wᵀ(C v)`` for two seeded random vectors.

    An operation whose backward cannot be differentiated (e.g. a ``torch.autograd.Function``
    with a ``@once_differentiable`` backward) is cut out of the double-backward graph without an
    error, so reverse-over-reverse would return a silently wrong, non-symmetric ``C``.
    """
    theta = flat_parameters(model, layout)
    W = torch.randn(2, theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = W.to(theta.device, theta.dtype)
    CW = _reverse_over_reverse(curvature_type, model, task, layout, batch, W)
    vCw, wCv = float(W[0] @ CW[1]), float(W[1] @ CW[0])
    scale = float(W[0].norm() * CW[1].norm() + W[1].norm() * CW[0].norm())
    if abs(vCw - wCv) > 10 * torch.finfo(theta.dtype).eps ** 0.5 * scale:
        raise _NotSymmetric(
            f"double backward gives a non-symmetric curvature (vᵀCw = {vCw:.6g}, wᵀCv = "
            f"{wCv:.6g}): an operation's backward is not differentiable (e.g. a "
            "torch.autograd.Function whose backward is marked @once_differentiable) and "
            "autograd silently drops it"
        )


def _pull(output: torch.Tensor, inputs: torch.Tensor, cotangent, create_graph: bool = False):
    """``∇_inputs ⟨output, cotangent⟩`` by autograd; zeros where ``output`` does not depend on
    ``inputs`` (e.g. the gradient of a loss linear in ``θ``)."""
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    (g,) = torch.autograd.grad(
        output, inputs, cotangent, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return torch.zeros_like(inputs) if g is None else g
