"""The hook path: per-example gradients from layer inputs ``a`` and output gradients ``g``.

For ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` (see :mod:`.capture`) one forward and one
backward pass that computes **no parameter gradient** records ``a (B, T, d_in)`` and
``g (B, T, d_out)``; the per-example weight gradient is ``Σ_t g_t a_tᵀ``. ``nn.LayerNorm``
with a 1-D elementwise affine is covered the same way (``∇γ = Σ_t g_t ⊙ x̂_t``, ``∇β = Σ_t g_t``
with ``x̂`` the normalised input). A weight tied to several of these layers (GPT-2's ``wte``
and ``lm_head``) gets the sum of every layer's contribution, each written in the weight's own
layout (:attr:`~influence.gradients.plan.LayerPlan.ties`). Every other attributed parameter goes
through the ``torch.func`` path (:func:`~influence.gradients.functional.per_sample_grads`
restricted to those parameters), so the combined result equals the pure ``torch.func`` one.

The kernels (one layer's gradients, ghost products) are in :mod:`.kernels`. :class:`GradientComputer`
runs the passes and returns a :class:`BatchGrads`, which keeps the
layers **factored** and forms only what is asked:

- ``flat(out=...)``: the materialised ``(B, P)`` gradients, written into a reused buffer;
- ``sq_norms()``: ghost norms ``‖∇θ ℓ_b‖²`` without forming any gradient;
- ``dot(other)``: ghost inner products ``⟨∇θ ℓ_i, ∇θ ℓ_j⟩ = Σ_layers ⟨A_iA_jᵀ, G_iG_jᵀ⟩``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..exceptions import FallbackWarning, InfluenceError
from ..params import ParameterLayout, module_name
from ..tasks import Task
from .capture import BatchAxisError, LayerCapture, LayerInfo, hookable_layers
from .kernels import LayerFactors, layer_dot, layer_sq_norms, matrix_shape, weight_grads
from .plan import LayerPlan, plan_layers, tie_params
from .functional import check_per_example, check_vmappable_modes, per_sample_grads, task_objective

GRADIENT_METHODS = ("auto", "func", "hooks")


def hook_layers(model: nn.Module, layout: ParameterLayout) -> dict[str, LayerInfo]:
    """Candidate layers of the gradient hook path: Linear/Conv2d/Embedding, HuggingFace
    ``Conv1D`` and 1-D affine LayerNorm. Which of them the hook path really computes is decided
    per model by :func:`~influence.gradients.plan.plan_layers`."""
    return hookable_layers(model, layout)


class BatchGrads:
    """Per-example gradients of one batch, kept factored per hook layer plus a dense rest.

    Attributes:
        n: number of examples.
        layers: ``{module_name: LayerFactors}`` for the hook layers.
        rest: ``(n, P_rest)`` dense gradients of the other parameters (or ``None``), in the
            order of ``computer.rest_layout``: tied weights (summed on the hook path) and
            the torch.func parameters.
        members: ``{module_name: LayerFactors}`` of the tied layers, whose contributions
            ``rest`` holds summed; kept only while ``computer.keep_tie_factors`` is set (for
            per-token scores, :mod:`influence._decompose`), empty otherwise.
    """

    def __init__(self, computer: "GradientComputer", n: int, layers: dict[str, LayerFactors], rest,
                 members: dict[str, LayerFactors] | None = None):
        self.computer = computer
        self.n = n
        self.layers = layers
        self.rest = rest
        self.members = members or {}

    def flat(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Materialised ``(n, P)`` gradients in the layout's order, written into ``out``."""
        c = self.computer
        P = c.layout.num_params
        if out is None:
            dtype = next(iter(self.layers.values())).g.dtype if self.layers else self.rest.dtype
            device = next(iter(self.layers.values())).g.device if self.layers else self.rest.device
            out = torch.empty(self.n, P, dtype=dtype, device=device)
        for name, f in self.layers.items():
            info = f.info
            # batched GEMMs write straight into the strided (n, d_out, d_in) view of ``out``
            # (torch 2.13 CPU: as fast as into a contiguous buffer, and no extra copy)
            weight_grads(f, out[:, c.slices[info.weight]].view(self.n, *c.wshape[name]))
            if info.bias is not None:
                torch.sum(f.g, dim=1, out=out[:, c.slices[info.bias]])
        if self.rest is not None:
            for name, sl in c.rest_slices:
                out[:, c.slices[name]] = self.rest[:, sl]
        return out

    def sq_norms(self) -> torch.Tensor:
        """``‖∇θ ℓ_b‖²`` for each example, ``(n,)``, ghost-computed per layer."""
        total = sum(layer_sq_norms(f) for f in self.layers.values())
        if self.rest is not None:
            total = total + self.rest.pow(2).sum(1)
        return total

    def dot(self, other: "BatchGrads") -> torch.Tensor:
        """``⟨∇θ ℓ_i, ∇θ ℓ'_j⟩``, shape ``(n, other.n)``, ghost-computed per layer."""
        total = 0
        for name, f in self.layers.items():
            total = total + layer_dot(f, other.layers[name])
        if self.rest is not None:
            total = total + self.rest @ other.rest.T
        return total


class GradientComputer:
    """Computes per-example gradients by the hook path, the torch.func path, or both.

    Which candidate layers (:func:`hook_layers`) the hook path computes is decided on the first
    batch by :func:`~influence.gradients.plan.plan_layers`: layers whose parameters are used
    outside them (functional uses), whose batch axis cannot be traced, or that fail the
    self-check go to torch.func; a weight tied to several such layers gets their summed
    contributions, delivered densely in :attr:`BatchGrads.rest` with the torch.func parameters;
    :meth:`coverage` reports the decision.

    Attributes (after the first batch):
        layers: ``{module: LayerInfo}`` kept factored.
        ties: ``{weight name: (LayerInfo, ...)}`` summed on the hook path, delivered densely.
        rest_layout: the densely delivered parameters (tied and torch.func), in layout order
            (``None`` when there are none); ``rest_slices`` their slices in ``BatchGrads.rest``.
        func_layout: the parameters the torch.func pass computes (``None``: no vmap pass).

    Args:
        model: the model (eval mode).
        task: reads batches.
        layout: the attributed parameters.
        method: ``"auto"`` (hooks for the planned layers, torch.func for the rest),
            ``"hooks"`` (same, but errors instead of falling back) or ``"func"`` (torch.func
            for everything).
        chunk_size: vmap chunk size of the torch.func part.
        self_check: compare the hook path with torch.func on two examples of the first batch.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask, select_parameters
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> comp = GradientComputer(model, ClassificationTask(), select_parameters(model))
        >>> grads = comp.compute((torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])))
        >>> grads.flat().shape, grads.dot(grads).shape
        (torch.Size([5, 26]), torch.Size([5, 5]))
        >>> comp.coverage()["0"]["path"], comp.coverage()["0"]["batch_axis"]
        ('hooks', 0)
    """

    def __init__(self, model: nn.Module, task: Task, layout: ParameterLayout, method: str = "auto",
                 chunk_size: int | None = None, self_check: bool = True):
        if method not in GRADIENT_METHODS:
            raise ValueError(f"Invalid gradient_method {method!r}. Supported: {GRADIENT_METHODS}.")
        self.model, self.task, self.layout, self.method, self.chunk_size = model, task, layout, method, chunk_size
        self.self_check = self_check
        self.candidates = {} if method == "func" else hook_layers(model, layout)
        if method == "hooks" and not self.candidates:
            raise InfluenceError(
                "gradient_method='hooks' but no attributed parameter belongs to a Linear, "
                "Conv2d, Embedding or LayerNorm module. Use gradient_method='func' or 'auto'."
            )
        self.plan: LayerPlan | None = None if self.candidates else LayerPlan({})
        self.layers: dict[str, LayerInfo] = {}
        self.ties: dict[str, tuple[LayerInfo, ...]] = {}
        self.keep_tie_factors = False  # BatchGrads.members: per-token scores only (memory)
        self._setup()

    def prepare(self, batch: Any) -> LayerPlan:
        """Plans the hook layers on ``batch`` (done by the first :meth:`compute` otherwise)."""
        if self.plan is None:
            # planned over every hookable layer, so that K-FAC's fit shares the (cached) plan
            shared = plan_layers(self.model, self.task, self.layout, hookable_layers(self.model, self.layout), batch, self.self_check)
            plan = LayerPlan(
                {n: i for n, i in shared.layers.items() if n in self.candidates},
                {n: why for n, why in shared.rejected.items() if n in self.candidates},
                shared.self_checked,
                {p: members for p, members in shared.ties.items() if members[0].name in self.candidates},
            )
            if self.method == "hooks" and plan.rejected:
                raise InfluenceError(
                    "gradient_method='hooks' but the hook path cannot compute "
                    + "; ".join(f"{name!r}: {why}" for name, why in plan.rejected.items())
                    + ". Use gradient_method='auto' (those layers then use torch.func)."
                )
            self.plan = plan
            self.layers, self.ties = dict(plan.layers), dict(plan.ties)
            self._setup()
        return self.plan

    def coverage(self) -> dict[str, dict[str, Any]]:
        """``{module: {"path": "hooks" | "func", "reason", "batch_axis", "parameters",
        "num_params"}}``: how each attributed parameter's per-example gradient is computed."""
        planned = self.plan.coverage() if self.plan is not None else {}
        owner = {p: name for name, info in {**self.candidates, **self.layers}.items() for p in (info.weight, info.bias) if p}
        numels = dict(zip(self.layout.names, self.layout.numels))
        out: dict[str, dict[str, Any]] = {}
        for p in self.layout.names:
            module = owner.get(p, module_name(p))
            entry = out.get(module)
            if entry is None:
                base = planned.get(module) or {
                    "path": "func", "batch_axis": None,
                    "reason": "torch.func by choice" if self.method == "func" else
                              "not a Linear/Conv2d/Embedding/LayerNorm layer with all its parameters attributed",
                }
                entry = out[module] = {**base, "parameters": (), "num_params": 0}
            entry["parameters"] += (p,)
            entry["num_params"] += numels[p]
        return out

    def _setup(self) -> None:
        covered = {n for i in self.layers.values() for n in (i.weight, i.bias) if n is not None}
        tied = {n for members in self.ties.values() for n in tie_params(members)}
        rest = [n for n in self.layout.names if n not in covered]
        self.rest_layout = self._sub_layout(rest)
        self.func_layout = self._sub_layout([n for n in rest if n not in tied])
        self.slices = self.layout.slices()
        self.rest_slices = list(self.rest_layout.slices().items()) if self.rest_layout else []
        self.wshape = {n: matrix_shape(i) for n, i in self.layers.items()}
        self.captured = {**self.layers, **{i.name: i for members in self.ties.values() for i in members}}

    def _sub_layout(self, names: list[str]) -> ParameterLayout | None:
        shapes = dict(zip(self.layout.names, self.layout.shapes))
        return ParameterLayout(tuple(names), tuple(shapes[n] for n in names)) if names else None

    def _drop_layer(self, error: BatchAxisError) -> None:
        """A batch contradicts the plan for one layer: it goes to torch.func from now on."""
        if self.method == "hooks":
            raise error
        warnings.warn(
            f"Layer {error.layer!r} cannot stay on the hook path: {error} It uses torch.func "
            "from now on (exact, slower).",
            FallbackWarning,
            stacklevel=4,
        )
        self.plan.drop(error.layer, f"its batch axis did not hold on a later batch ({error})")
        self.layers, self.ties = dict(self.plan.layers), dict(self.plan.ties)
        self._setup()

    def compute(self, batch: Any, objective: str = "loss") -> BatchGrads:
        """Per-example gradients of one batch (factored where the hook path applies)."""
        fn = task_objective(self.task, objective)
        n = self.task.num_examples(batch)
        self.prepare(batch)
        factors: dict[str, LayerFactors] = {}
        if self.captured:
            check_vmappable_modes(self.model)
            try:
                with LayerCapture(self.captured, batch_size=n, raw_conv_inputs=True) as cap:
                    cap.backward(check_per_example(fn(self.model, batch), n, self.task))
            except BatchAxisError as error:
                self._drop_layer(error)
                return self.compute(batch, objective)
            for name, info in self.captured.items():
                if name not in cap.output_grads:  # layer not used by this batch's forward
                    w = info.module.weight
                    g = w.new_zeros(n, 0, info.d_out)
                    a = torch.zeros(n, 0, dtype=torch.long, device=w.device) if info.kind == "embedding" else w.new_zeros(n, 0, info.d_in)
                    factors[name] = LayerFactors(info, a, g)
                    continue
                g = cap.output_grads[name]
                if name in cap.raw_inputs:  # a Conv2d called once: patches only on demand
                    factors[name] = LayerFactors(info, None, g, x=cap.raw_inputs[name])
                    continue
                a = cap.inputs[name]
                if info.kind == "layernorm":
                    a = a.reshape(n, -1, info.d_in)
                factors[name] = LayerFactors(info, a, g)
        members = {name: factors.pop(name) for name in self.captured if name not in self.layers}
        rest = self._dense(batch, objective, n, members)
        return BatchGrads(self, n, factors, rest, members if self.keep_tie_factors else None)

    def _dense(self, batch: Any, objective: str, n: int, members: dict[str, LayerFactors]) -> torch.Tensor | None:
        """``(n, P_rest)``: each tied weight's members' contributions summed in place, and the
        torch.func pass (only if some parameter needs it)."""
        func = None
        if self.func_layout is not None:
            func = per_sample_grads(self.model, self.task, batch, self.func_layout, self.chunk_size, objective)
        if not self.ties:
            return func
        like = next(iter(members.values())).g
        rest = torch.empty(n, self.rest_layout.num_params, dtype=like.dtype, device=like.device)
        where = dict(self.rest_slices)
        for weight, infos in self.ties.items():
            for k, info in enumerate(infos):
                f = members[info.name]
                weight_grads(f, rest[:, where[weight]].view(n, *matrix_shape(info)), accumulate=k > 0)
                if info.bias is not None:
                    torch.sum(f.g, dim=1, out=rest[:, where[info.bias]])
        if func is not None:
            for name, sl in self.func_layout.slices().items():
                rest[:, where[name]] = func[:, sl]
        return rest

    def flat(self, batch: Any, objective: str = "loss", out: torch.Tensor | None = None) -> torch.Tensor:
        """Materialised per-example gradients ``(B, P)``."""
        return self.compute(batch, objective).flat(out)


def fast_per_sample_grads(model: nn.Module, task: Task, batch: Any, params="trainable", objective: str = "loss", method: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for :func:`per_sample_grads` that uses the hook path where it applies.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask
        >>> model = torch.nn.Linear(3, 2)
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> fast_per_sample_grads(model, ClassificationTask(), batch).shape
        torch.Size([4, 8])
    """
    from ..params import select_parameters

    return GradientComputer(model, task, select_parameters(model, params), method).flat(batch, objective, out)
