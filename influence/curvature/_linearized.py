"""One batch's curvature kept in factored form, so that repeated products skip the model.

CG, Lanczos, LiSSA and power iteration apply the same batch curvature ``C_b = Σ_{j∈b} C_j``
to new vectors tens to thousands of times, and :func:`~._products.batch_matmat` recomputes
everything for each product: a forward pass, a backward pass and a tangent pass. A
*linearisation* keeps what depends only on ``θ`` and the batch, so that a product costs only
what remains:

- ``"fisher"`` (:class:`GradientRows`): the per-example gradients ``G`` (``B × P``);
  ``C_b V = (V Gᵀ) G``, two matrix products.
- ``"ggn"`` (:class:`OutputJacobian`), where its products are the cheaper ones
  (:func:`jacobian_pays_off`): the per-example output Jacobians ``J_j = ∂f(z_j)/∂θ``
  (``B × K × P``, ``K`` outputs per example) and the output-loss Hessians
  ``H_j = ∂²ℓ_j/∂f²`` (``B × K × K``); ``C_b V = Σ_j J_jᵀ H_j J_j V``, two matrix products and a
  batched ``K × K`` one. The dense ``C_b = Σ_j J_jᵀ (H_j J_j)`` is one more
  (:meth:`OutputJacobian.dense`) instead of ``P`` products.
- ``"hessian"`` (:class:`HessianGraph`): the autograd graph of ``∇ℓ`` built once with
  ``create_graph=True``; ``C_b V = ∇_θ⟨∇ℓ, v⟩`` for all rows at once (``is_grads_batched``): one
  backward pass through the kept graph.

:func:`linearize` builds one (``None`` where it does not apply). The caller
(:class:`~._operator.CurvatureOperator`) bounds the memory they take and checks the first one
against :func:`~._products.batch_matmat` (:func:`agrees`): a model on which they disagree
(e.g. an operation whose backward is not twice differentiable, or a loss coupling the
examples of a batch) keeps the plain products.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import grad, jacrev, jvp, vmap
from torch.utils._pytree import tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from ..gradients._transforms import transform_kernels
from ..gradients.functional import split_batch
from ..params import ParameterLayout
from ..tasks import OutputTask, Task
from ._products import batch_matmat, flat_parameters, functional

#: A batch's output Jacobian of at most this many entries is always kept (see
#: :func:`jacobian_pays_off`).
SMALL_JACOBIAN = 2**20

#: Dense matrices by products (:meth:`Linearizer.dense`): columns per batched product are
#: chosen so that the products' intermediates take about this many bytes.
DENSE_CHUNK_BYTES = 2**28


class GradientRows:
    """``C_b = Gᵀ G`` from the per-example gradients ``G`` (``B × P``): the empirical Fisher."""

    def __init__(self, G: torch.Tensor):
        self.G = G
        self.nbytes = G.numel() * G.element_size()

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return (V @ self.G.T) @ self.G

    def dense(self) -> torch.Tensor:
        return (self.G.T @ self.G).double()


class OutputJacobian:
    """``C_b = Σ_j J_jᵀ H_j J_j`` from output Jacobians ``J`` (``B, K, P``) and blocks ``H`` (``B, K, K``)."""

    def __init__(self, J: torch.Tensor, H: torch.Tensor):
        self.J, self.H = J, H
        self.flat = J.reshape(-1, J.shape[-1])
        self.nbytes = (J.numel() + H.numel()) * J.element_size()

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        B, K, _ = self.J.shape
        u = (V @ self.flat.T).reshape(len(V), B, K)
        return torch.einsum("nbk,bkl->nbl", u, self.H).reshape(len(V), B * K) @ self.flat

    def dense(self) -> torch.Tensor:
        HJ = torch.einsum("bkl,blp->bkp", self.H, self.J).reshape(self.flat.shape)
        return (self.flat.T @ HJ).double()


class HessianGraph:
    """``C_b v = ∇_θ⟨∇ℓ, v⟩`` through the kept autograd graph of ``∇ℓ = ∇_θ Σ_{j∈b} ℓ_j``."""

    def __init__(self, model: nn.Module, task: Task, layout: ParameterLayout, batch: Any):
        self.model = model
        self.theta = flat_parameters(model, layout).requires_grad_(True)
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with torch.enable_grad(), transform_kernels(model), hooks:
            total = functional(model, layout, lambda m, b: task.loss(m, b).sum(), batch)(self.theta)
            (self.gradient,) = torch.autograd.grad(total, self.theta, create_graph=True)
        self.nbytes = saved[0] + 2 * self.theta.numel() * self.theta.element_size()

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        if not self.gradient.requires_grad:  # a loss linear in θ
            return torch.zeros_like(V)
        with torch.enable_grad(), transform_kernels(self.model):
            (out,) = torch.autograd.grad(
                self.gradient, self.theta, V, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        return torch.zeros_like(V) if out is None else out.detach()


Linearized = GradientRows | OutputJacobian | HessianGraph


def jacobian_pays_off(model: nn.Module, task: OutputTask, layout: ParameterLayout, batch: Any, K: int) -> bool:
    """Whether the :class:`OutputJacobian` of a batch gives cheaper products than
    :func:`~._products.batch_matmat`.

    Per example and vector, its products cost ``4·K·P`` flops (two matrix products with ``J``),
    the plain ones ``~3·F`` (a tangent forward pass and a backward pass; ``F`` the forward flops
    per example, counted once with torch's ``FlopCounterMode``): kept when ``4·K·P <= 3·F``
    (e.g. convolutions, which reuse each weight many times), and whenever the batch's Jacobian
    has at most :data:`SMALL_JACOBIAN` entries, where the plain products' fixed cost per call
    (a hundred or so operator launches) dominates. ``benchmarks/bench_linearized.py`` measures
    both: on an MLP (``F = 2P``) with 40 examples per batch and 50 vectors, the kept Jacobian is
    3.3x faster at ``P = 1669, K = 5`` (334k entries) and 2.4x slower at ``P = 27141, K = 5``.
    """
    B, P = task.num_examples(batch), layout.num_params
    if B * K * P <= SMALL_JACOBIAN:
        return True
    with torch.no_grad(), transform_kernels(model), FlopCounterMode(display=False) as counter:
        functional(model, layout, task.forward, batch)(flat_parameters(model, layout))
    return 4 * K * P <= 3 * counter.get_total_flops() / max(B, 1)


def outputs_per_example(task: Task, model: nn.Module, layout: ParameterLayout, batch: Any) -> int | None:
    """``K``, the number of model outputs per example, or ``None`` when the outputs are not
    batch-first tensors."""
    with torch.no_grad(), transform_kernels(model):
        outputs = functional(model, layout, task.forward, batch)(flat_parameters(model, layout))
    n = task.num_examples(batch)
    if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0 or outputs.shape[0] != n:
        return None
    return outputs[0].numel()


def linearize(curvature_type: str, model: nn.Module, task: Task, layout: ParameterLayout, batch: Any) -> Linearized | None:
    """The linearisation of one batch's ``"ggn"`` or ``"hessian"``, or ``None`` where none
    applies or pays off (the GGN of a task without the output split, or where
    :func:`jacobian_pays_off` says no). The empirical Fisher's (:class:`GradientRows`) is built
    by the caller from its per-example gradients."""
    if curvature_type == "hessian":
        return HessianGraph(model, task, layout, batch)
    if curvature_type != "ggn" or not isinstance(task, OutputTask):
        return None
    K = outputs_per_example(task, model, layout, batch)
    if K is None or not jacobian_pays_off(model, task, layout, batch, K):
        return None
    return ggn_linearization(model, task, layout, batch)


def ggn_linearization(model: nn.Module, task: OutputTask, layout: ParameterLayout, batch: Any) -> OutputJacobian:
    """The :class:`OutputJacobian` of one batch (``J`` and ``H``, from one vmapped ``jacrev``
    and ``K`` products with the output loss's Hessian)."""
    with torch.no_grad(), transform_kernels(model):
        J, outputs = per_example_jacobian(model, task, layout, batch)
        return OutputJacobian(J, output_hessians(task, batch, outputs.reshape(outputs.shape[0], *outputs.shape[2:])))


def per_example_jacobian(model: nn.Module, task: OutputTask, layout: ParameterLayout, batch: Any):
    """``J[j] = ∂ vec f(z_j) / ∂θ``, shape ``(B, K, P)``, and the outputs ``(B, 1, ...)``:
    ``jacrev`` vmapped over the examples, each presented to the task as a batch of one (as for
    per-example gradients)."""
    leaves, spec, batched, _ = split_batch(task, batch)
    theta = flat_parameters(model, layout)

    def one(flat: torch.Tensor, *example_leaves: torch.Tensor):
        rebuilt = [leaf.unsqueeze(0) if is_b else leaf for leaf, is_b in zip(example_leaves, batched)]
        out = functional(model, layout, task.forward, tree_unflatten(rebuilt, spec))(flat)
        return out.reshape(-1), out

    in_dims = (None, *[0 if b else None for b in batched])
    return vmap(jacrev(one, has_aux=True), in_dims=in_dims)(theta, *leaves)


def output_hessians(task: OutputTask, batch: Any, outputs: torch.Tensor) -> torch.Tensor:
    """``H[j] = ∂²ℓ_j/∂f_j²`` (``(B, K, K)``) at the batch's ``outputs``: the blocks of the
    output loss's Hessian.

    The loss is a sum of per-example terms, each a function of its own example's outputs, so
    its Hessian in all outputs is block diagonal and the ``K`` products with
    ``e_k ⊗ 1`` (component ``k`` of every example at once) give all blocks.
    """
    outputs = outputs.detach()
    targets = task.targets(batch)
    output_grad = grad(lambda o: task.output_loss(o, targets, batch).sum())
    B, K = outputs.shape[0], outputs[0].numel()
    units = torch.eye(K, dtype=outputs.dtype, device=outputs.device)[:, None, :].expand(K, B, K)
    columns = vmap(lambda e: jvp(output_grad, (outputs,), (e.reshape(outputs.shape),))[1])(units)
    return columns.reshape(K, B, K).permute(1, 2, 0).contiguous()  # [j, i, k] = ∂²ℓ_j/∂f_ji∂f_jk


class Linearizer:
    """Builds the linearisations of one model's batches, checking the first one.

    :meth:`__call__` returns a batch's linearisation, or ``None`` where none applies; the
    first one built is compared with :func:`~._products.batch_matmat` (:func:`agrees`), and if
    they disagree, or building fails, this linearizer returns ``None`` from then on, so the
    caller uses the plain products (which report genuine errors in their own words).
    :meth:`dense` gives a batch's dense ``C_b`` (float64) the cheapest way it knows.
    """

    def __init__(self, curvature_type: str, model: nn.Module, task: Task, layout: ParameterLayout):
        self.curvature_type = curvature_type
        self.model, self.task, self.layout = model, task, layout
        self.enabled: bool | None = None if curvature_type in ("ggn", "hessian") else False
        self._column_bytes: float | None = None  # per example, for dense chunks of products

    def __call__(self, batch: Any) -> Linearized | None:
        if self.enabled is False:
            return None
        try:  # (whether the GGN's Jacobian pays off is decided on the first batch)
            if self.enabled is None or self.curvature_type == "hessian":
                entry = linearize(self.curvature_type, self.model, self.task, self.layout, batch)
            else:
                entry = ggn_linearization(self.model, self.task, self.layout, batch)
        except Exception:  # the plain products handle (or report) what the model does not support
            entry = None
        if entry is None or self.enabled is None and not agrees(
            entry, self.curvature_type, self.model, self.task, self.layout, batch
        ):
            self.enabled = False
            return None
        self.enabled = True
        return entry

    def dense(self, batch: Any, chunk_size: int | None = None, entry: Linearized | None = None) -> torch.Tensor:
        """``C_b`` of one batch as a dense float64 ``(P, P)`` matrix.

        From ``entry`` or a new linearisation when it has a dense form (the GGN's
        ``Σ_j J_jᵀ(H_j J_j)``); otherwise column block by column block of the identity,
        ``chunk_size`` columns per batched product, by default as many as keep the products'
        intermediates near :data:`DENSE_CHUNK_BYTES` (estimated from the first batch's
        autograd graph).
        """
        if entry is None and self.curvature_type == "ggn":
            entry = self(batch)
        if isinstance(entry, (GradientRows, OutputJacobian)):
            return entry.dense()
        P = self.layout.num_params
        theta = flat_parameters(self.model, self.layout)
        step = chunk_size or self._auto_chunk(batch)
        matrix = torch.empty(P, P, dtype=torch.float64, device=theta.device)
        eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
        for start in range(0, P, step):
            block = batch_matmat(self.curvature_type, self.model, self.task, self.layout, batch, eye[start : start + step])
            matrix[start : start + step] = block
        return matrix

    def _auto_chunk(self, batch: Any) -> int:
        n = self.task.num_examples(batch)
        if self._column_bytes is None:
            try:
                self._column_bytes = HessianGraph(self.model, self.task, self.layout, batch).nbytes / max(n, 1)
            except Exception:  # estimated by the products' own failure path, with the default
                self._column_bytes = DENSE_CHUNK_BYTES / 256 / max(n, 1)
        return int(max(1, min(self.layout.num_params, DENSE_CHUNK_BYTES // max(self._column_bytes * n, 1))))


def agrees(entry: Linearized, curvature_type: str, model: nn.Module, task: Task, layout: ParameterLayout, batch: Any) -> bool:
    """Whether ``entry`` applies the same ``C_b`` as :func:`~._products.batch_matmat`, on two
    seeded random vectors, up to ``10·√ε`` of the product's norm."""
    theta = flat_parameters(model, layout)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(2, theta.numel(), generator=g, dtype=torch.float64).to(theta.device, theta.dtype)
    reference = batch_matmat(curvature_type, model, task, layout, batch, V)
    with torch.no_grad():
        got = entry.apply(V)
    scale = float(reference.norm()) + float(got.norm())
    return bool(torch.isfinite(got).all()) and float((got - reference).norm()) <= 10 * torch.finfo(theta.dtype).eps ** 0.5 * scale
