"""Which layers the hook path may compute: decided from how a batch flows through the model.

The hook path (:mod:`.capture`, :mod:`.hooks`) reads a layer's per-example gradient off its
inputs and output gradients (``∇W ℓ_b = Σ_t g_bt a_btᵀ``). That is exact only when

1. each of the layer's parameters is used **only inside the layer's own forward**: not tied to
   another module (GPT-2's ``wte`` and ``lm_head``), not used functionally elsewhere
   (``h @ emb.weight.T``), not read by a parent that bypasses the layer's hooks; and
2. the layer's inputs and outputs have **one axis that indexes the examples**: batch-first,
   another axis (PyTorch's default sequence-first ``(T, B, d)`` transformer layers), or a
   leading 1 shared by the whole batch (GPT-2's ``(1, T)`` position ids) whose expansion to
   one copy per example leaves the model's outputs unchanged.

:func:`plan_layers` checks both on a batch of the data, never by guessing from shapes:

- **use probe**: a forward under a :class:`~torch.overrides.TorchFunctionMode` records every
  torch function applied to a candidate's parameters and which module was running; a use
  outside the owning layer (metadata reads such as ``.shape`` aside) disqualifies the layer;
- **axis probe**: forwards at two batch sizes (2 and 3 copies of the batch's first examples);
  a layer's batch axis is the one output axis whose size is 2, then 3. No such axis, or
  several, disqualifies the layer (e.g. nanoGPT's ``wpe(arange(T))``, of shape ``(T, d)``
  whatever the batch); a shared leading 1 is accepted after a third forward confirms that
  expanding it changes no output;
- **self-check** (``self_check=True``): the hook path's per-example gradients of the first
  and last example of the real batch, compared parameter by parameter with plain autograd's
  (each example alone, as torch.func defines them)
  (relative tolerance ``√eps`` of the dtype); a mismatch disqualifies the layer with a
  :class:`~influence.FallbackWarning` naming it.

Disqualified layers go to the exact torch.func path; :attr:`LayerPlan.rejected` says why.
Plans are cached per model (weakly) and per layout, candidate set, task and train/eval state.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..exceptions import FallbackWarning, InfluenceError
from ..params import ParameterLayout
from ..tasks import Task
from .capture import BatchAxisError, LayerCapture, LayerInfo, layer_grads
from .functional import _PerExample, check_per_example, split_batch, take_examples

PROBE_SIZES = (2, 3)

# Tensor attributes and methods that read metadata only: no value flows, no gradient
_METADATA = frozenset(
    "shape dtype device ndim requires_grad is_cuda is_sparse is_quantized is_meta layout names "
    "is_leaf grad_fn grad data _version itemsize nbytes is_mps is_nested is_mkldnn is_complex "
    "size dim numel nelement ndimension stride storage_offset element_size is_floating_point "
    "is_contiguous data_ptr get_device detach __len__ __hash__ untyped_storage".split()
)


@dataclass
class LayerPlan:
    """The layers the hook path computes, and why the others do not.

    Attributes:
        layers: ``{module name: LayerInfo}`` accepted, with their ``batch_axis`` set.
        rejected: ``{module name: reason}`` for candidates left to the exact torch.func path.
        self_checked: whether the self-check ran.
    """

    layers: dict[str, LayerInfo]
    rejected: dict[str, str] = field(default_factory=dict)
    self_checked: bool = False

    def coverage(self) -> dict[str, dict[str, Any]]:
        """``{module: {"path": "hooks" | "func", "reason", "batch_axis"}}`` per candidate."""
        out: dict[str, dict[str, Any]] = {}
        for name, info in self.layers.items():
            out[name] = {"path": "hooks", "reason": None, "batch_axis": info.batch_axis}
        for name, reason in self.rejected.items():
            out[name] = {"path": "func", "reason": reason, "batch_axis": None}
        return out


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def plan_layers(
    model: nn.Module,
    task: Task,
    layout: ParameterLayout,
    candidates: dict[str, LayerInfo],
    batch: Any,
    self_check: bool = True,
) -> LayerPlan:
    """Decides which ``candidates`` the hook path computes exactly (see the module docstring).

    Args:
        model, task, layout: the model, how batches are read, the attributed parameters.
        candidates: layers the caller can capture (e.g. :func:`~.capture.hookable_layers`).
        batch: one batch of the data (the first training batch at fit).
        self_check: also compare per-example gradients with torch.func on ``batch``.
    """
    # structure (module and parameter objects, as re-tying or swapping a module replaces them),
    # train/eval state, layout, candidates and task: anything a plan depends on but the data
    structure = tuple((id(m), m.training) for m in model.modules()) + tuple(id(p) for p in model.parameters())
    key = (structure, layout.names, tuple(candidates), type(task).__qualname__, repr(task), self_check)
    cached = _CACHE.setdefault(model, {})
    if key in cached:
        return cached[key]
    plan = LayerPlan({}, {})
    if candidates:
        shapes, misuse = _probe(model, task, batch, candidates)
        for name, info in candidates.items():
            axis, reason = (None, misuse[name]) if name in misuse else _batch_axis(info, *shapes[name])
            if reason is None:
                plan.layers[name] = dataclasses.replace(info, batch_axis=axis)
            else:
                plan.rejected[name] = reason
        _confirm_shared(model, task, batch, plan)
        if self_check and plan.layers:
            _self_check(model, task, batch, plan)
            plan.self_checked = True
    cached[key] = plan
    return plan


# ----------------------------------------------------------------------------------- probes
class _UseRecorder(TorchFunctionMode):
    """Records torch functions applied to watched parameters outside their owning module."""

    def __init__(self, watched: dict[int, tuple[str, str]], modules: dict[int, str]):
        super().__init__()
        self.watched = watched  # id(parameter) -> (owning candidate layer, "weight" | "bias")
        self.modules = modules  # id(module) -> name
        self.stack: list[nn.Module] = []
        self.misuse: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_flatten((args, kwargs))[0]:
            owner, role = self.watched.get(id(leaf), (None, None)) if isinstance(leaf, torch.Tensor) else (None, None)
            if owner is None or owner in self.misuse or _metadata_only(func):
                continue
            running = self.stack[-1] if self.stack else None
            where = self.modules.get(id(running), "?") if running is not None else None
            if where != owner:
                place = f"{where or '<root>'} ({type(running).__name__})" if running is not None else "code outside any module"
                self.misuse[owner] = f"its {role} is also used by {place} via {_func_name(func)} (tied or functional use)"
        return func(*args, **kwargs)


def _metadata_only(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name in _METADATA


def _func_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return "." + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name


def _probe(model, task, batch, candidates):
    """Output/input shapes of every candidate call at the two probe sizes, and misused layers."""
    n = task.num_examples(batch)
    modules = {id(m): name for name, m in model.named_modules()}
    watched = {}
    for name, info in candidates.items():
        for pname, role in ((info.weight, "weight"), (info.bias, "bias")):
            if pname is not None:
                watched[id(model.get_parameter(pname))] = (name, role)
    recorder = _UseRecorder(watched, modules)
    records: dict[str, list] = {name: [] for name in candidates}
    def enter(module, args):
        recorder.stack.append(module)

    def leave(module, args, output):
        if recorder.stack:
            recorder.stack.pop()

    def record(name):
        def hook(module, args, output):
            records[name].append((_shape(args[0] if args else None), _shape(output)))

        return hook

    handles = []
    for m in model.modules():  # the innermost running module, for the use recorder
        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    for name, info in candidates.items():
        handles.append(info.module.register_forward_hook(record(name)))
    shapes: dict[str, list] = {name: [] for name in candidates}
    try:
        with torch.enable_grad():  # the capture's forward: grad-dependent fast paths alike
            for size in PROBE_SIZES:
                for r in records.values():
                    r.clear()
                sub = take_examples(task, batch, torch.arange(size) % n)
                if size == PROBE_SIZES[0]:
                    with recorder:
                        check_per_example(task.loss(model, sub), size, task)
                else:
                    task.loss(model, sub)
                for name in candidates:
                    shapes[name].append(list(records[name]))
    finally:
        for h in handles:
            h.remove()
    return {name: tuple(s) for name, s in shapes.items()}, recorder.misuse


def _shape(t) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _batch_axis(info: LayerInfo, calls1: list, calls2: list) -> tuple[int | None, str | None]:
    """``(axis, None)`` or ``(None, reason)`` from the layer's calls at the two probe sizes.

    The axis is ``None`` (with no reason) for a leading 1 shared by the batch.
    """
    n1, n2 = PROBE_SIZES
    if len(calls1) != len(calls2):
        return None, f"called {len(calls1)} times for {n1} examples but {len(calls2)} times for {n2}"
    if not calls1:
        return 0, None  # did not run on this batch: it contributes nothing there
    axes = set()
    for (in1, out1), (in2, out2) in zip(calls1, calls2):
        if out1 is None or out2 is None or len(out1) != len(out2) or in1 is None or in2 is None:
            return None, "its input or output is not a tensor of a fixed rank"
        varying = [k for k in range(len(out1)) if out1[k] != out2[k]]
        if len(varying) == 1 and (out1[varying[0]], out2[varying[0]]) == (n1, n2):
            axis = varying[0]
        elif not varying and len(out1) > 1 and out1[0] == 1 and in1[:1] == (1,):
            axis = None  # shared by the batch, leading 1
        else:
            return None, (
                f"no single axis of its output follows the number of examples (shape {out1} "
                f"for {n1} examples, {out2} for {n2}): its input is shared by the batch or mixes "
                "examples with other axes"
            )
        if axis is not None and (len(in1) <= axis or (in1[axis], in2[axis]) != (n1, n2)):
            return None, f"its input's axis {axis} does not follow the number of examples"
        axes.add(axis)
    if len(axes) > 1:
        return None, f"its calls have different batch axes {sorted(axes, key=str)}"
    axis = axes.pop()
    if info.kind == "conv2d" and axis != 0:
        return None, f"a Conv2d needs batch-first inputs (found axis {axis})"
    return axis, None


def _confirm_shared(model, task, batch, plan: LayerPlan) -> None:
    """Keeps shared-input layers only if expanding their output per example changes nothing."""
    shared = [name for name, info in plan.layers.items() if info.batch_axis is None]
    if not shared:
        return
    n = task.num_examples(batch)
    sub = take_examples(task, batch, torch.arange(PROBE_SIZES[1]) % n)
    size = PROBE_SIZES[1]

    def expand(mod, args, out):
        return out.expand(size, *out.shape[1:]) if out.shape[0] == 1 else out

    with torch.no_grad():
        reference = task.loss(model, sub)
        handles = [plan.layers[name].module.register_forward_hook(expand) for name in shared]
        try:
            expanded = task.loss(model, sub)
            same = expanded.shape == reference.shape and bool(torch.allclose(expanded, reference, rtol=1e-5, atol=1e-6))
        except Exception:
            same = False
        finally:
            for h in handles:
                h.remove()
    if not same:
        for name in shared:
            del plan.layers[name]
            plan.rejected[name] = (
                "its input is shared by the batch (leading dimension 1), and giving each example "
                "its own copy changes the model's outputs"
            )


# ----------------------------------------------------------------------------------- self-check
def _self_check(model, task, batch, plan: LayerPlan) -> None:
    """Compares hook-path and torch.func per-example gradients on two examples of ``batch``."""
    n = task.num_examples(batch)
    rows = sorted({0, n - 1})
    while plan.layers:
        try:
            hooks = _hook_grads(model, task, batch, plan.layers, rows)
            break
        except BatchAxisError as error:  # the real batch contradicts the probe: that layer out
            name = error.layer
            del plan.layers[name]
            plan.rejected[name] = f"its batch axis does not hold on the data ({error})"
    if not plan.layers:
        return
    names = [p for info in plan.layers.values() for p in (info.weight, info.bias) if p is not None]
    shapes = dict(zip(names, (model.get_parameter(p).shape for p in names)))
    sub_layout = ParameterLayout(tuple(names), tuple(shapes[p] for p in names))
    exact = _autograd_grads(model, task, take_examples(task, batch, torch.tensor(rows)), sub_layout)
    total = math.sqrt(sum(float(exact[p].double().pow(2).sum()) for p in names))
    tol = max(math.sqrt(torch.finfo(exact[names[0]].dtype).eps), 1e-7)
    bad = {}
    for name, info in list(plan.layers.items()):
        for p in (info.weight, info.bias):
            if p is None:
                continue
            err = float((hooks[p].double() - exact[p].double()).norm())
            scale = float(exact[p].double().norm()) + float(hooks[p].double().norm()) + 1e-6 * total
            if err > tol * scale:
                bad[name] = err / max(float(exact[p].double().norm()), 1e-300)
                break
    for name, rel in bad.items():
        del plan.layers[name]
        plan.rejected[name] = (
            f"the self-check found its hook-path gradients off by {rel:.2g} (relative) from "
            "autograd's (each example alone) on the first batch"
        )
    if bad:
        warnings.warn(
            "Self-check: the hook path's per-example gradients of "
            + ", ".join(f"{name!r} (off by {rel:.2g})" for name, rel in bad.items())
            + " disagree with autograd's (each example alone) on the first batch; they use the "
            "exact torch.func path instead (slower). The model mixes examples within a batch "
            "or uses these parameters in a way the hook path cannot see: please report it.",
            FallbackWarning,
            stacklevel=4,
        )


def _autograd_grads(model, task, batch, layout: ParameterLayout) -> dict[str, torch.Tensor]:
    """Per-example gradients by plain autograd, one example at a time (no torch.func: the
    reference the hook path must match, without vmap's first-call set-up cost)."""
    engine = _PerExample(model, task, layout, "loss")
    leaves, spec, batched, n = split_batch(task, batch)
    tensors = {p: t.detach() for p, t in layout.tensors(model).items()}
    return engine.looped(tensors, leaves, spec, batched, n)


def _hook_grads(model, task, batch, layers, rows) -> dict[str, torch.Tensor]:
    """Per-example gradients of the ``rows`` examples, by the hook path, per parameter name."""
    n = task.num_examples(batch)
    with LayerCapture(layers, batch_size=n) as cap:
        cap.backward(task.loss(model, batch))
    out = {}
    index = torch.tensor(rows)
    for name, info in layers.items():
        if name in cap.output_grads:
            g = cap.output_grads[name]
            a = cap.inputs[name]
            grads = layer_grads(info, a[index.to(a.device)], g[index.to(g.device)])
        else:  # did not run: zero gradients
            grads = {p: model.get_parameter(p).new_zeros(len(rows), *model.get_parameter(p).shape)
                     for p in (info.weight, info.bias) if p is not None}
        for p, v in grads.items():
            out[p] = v.reshape(len(rows), *model.get_parameter(p).shape)
    return out


__all__ = ["LayerPlan", "plan_layers", "PROBE_SIZES"]
