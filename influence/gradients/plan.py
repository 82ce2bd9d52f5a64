"""Which layers the hook path may compute: decided from how a batch flows through the model.

The hook path (:mod:`.capture`, :mod:`.hooks`) reads a layer's per-example gradient off its
inputs and output gradients (``∇W ℓ_b = Σ_t g_bt a_btᵀ``). That is exact only when

1. each of the layer's parameters is used **only inside the layer's own forward**: not used
   functionally elsewhere (``h @ emb.weight.T``), not read by a parent that bypasses the
   layer's hooks; a weight **tied** to other supported layers (GPT-2's ``wte`` and
   ``lm_head``) is the one exception, see below; and
2. the layer's inputs and outputs have **one axis that indexes the examples**: batch-first,
   another axis (PyTorch's default sequence-first ``(T, B, d)`` transformer layers), or a
   leading 1 shared by the whole batch (GPT-2's ``(1, T)`` position ids) whose expansion to
   one copy per example leaves the model's outputs unchanged.

:func:`plan_layers` checks both on a batch of the data, never by guessing from shapes:

- **use probe**: a forward under a :class:`~torch.overrides.TorchFunctionMode` records every
  torch function applied to an attributed parameter and which module was running; a use
  outside the owning layer (metadata reads such as ``.shape`` aside) disqualifies the layer,
  unless it makes a **tie** (below);
- **axis probe**: forwards at two batch sizes (2 and 3 copies of the batch's first examples);
  a layer's batch axis is the one output axis whose size is 2, then 3. No such axis, or
  several, disqualifies the layer (e.g. nanoGPT's ``wpe(arange(T))``, of shape ``(T, d)``
  whatever the batch); a shared leading 1 is accepted after a third forward confirms that
  expanding it changes no output;
- **self-check** (``self_check=True``): the hook path's per-example gradients of the first
  and last example of the real batch, compared parameter by parameter with plain autograd's
  (each example alone, as torch.func defines them)
  (relative tolerance ``√eps`` of the dtype, with the scale floored at
  :data:`SELF_CHECK_FLOOR` times the norm of all the checked gradients, since rounding is
  relative to the whole); a mismatch disqualifies the layer with a
  :class:`~influence.FallbackWarning` naming it.

**Ties.** A weight ``W`` held as the ``weight`` of several supported layers (Linear, Embedding,
Conv2d, HF Conv1D: e.g. ``lm_head.weight is wte.weight``) has the per-example gradient
``Σ_layers Σ_t (contribution of that layer's tokens)``, every term in ``W``'s own layout. The
plan keeps such a weight on the hook path (:attr:`LayerPlan.ties`, its layers captured and
their contributions summed) when **every** use of ``W`` is inside the forward of one of those
layers, each has a traced batch axis, and each follower's bias is absent or attributed and
its own. A use anywhere else (``h @ emb.weight.T``, a parent's ``F.linear``) sends the weight
to torch.func as before. The self-check compares the **summed** gradient with autograd's.

Disqualified layers go to the exact torch.func path; :attr:`LayerPlan.rejected` says why.
Plans are cached per model (weakly) and per layout, candidate set, task and train/eval state.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..exceptions import FallbackWarning
from ..params import ParameterLayout
from ..tasks import Task
from ._probes import PROBE_SIZES, TIE_KINDS, batch_axis, foreign_uses, probe, tie
from .capture import BatchAxisError, LayerCapture, LayerInfo, layer_grads
from .functional import _PerExample, split_batch, take_examples


@dataclass
class LayerPlan:
    """The layers the hook path computes, and why the others do not.

    Attributes:
        layers: ``{module name: LayerInfo}`` accepted, with their ``batch_axis`` set.
        rejected: ``{module name: reason}`` for candidates left to the exact torch.func path.
        self_checked: whether the self-check ran.
        ties: ``{weight name: (LayerInfo, ...)}``: tied weights computed on the hook path by
            summing the contributions of every layer holding them (the candidate that owns the
            name first, then the others in the order they ran). Each member's ``weight`` is the
            layout's name of the tied weight, its ``bias`` its own bias (or ``None``). Members
            are not in ``layers``.
    """

    layers: dict[str, LayerInfo]
    rejected: dict[str, str] = field(default_factory=dict)
    self_checked: bool = False
    ties: dict[str, tuple[LayerInfo, ...]] = field(default_factory=dict)

    def coverage(self) -> dict[str, dict[str, Any]]:
        """``{module: {"path": "hooks" | "func", "reason", "batch_axis"}}`` per candidate and
        tie member (whose ``reason`` says which contributions are summed)."""
        out: dict[str, dict[str, Any]] = {}
        for name, info in self.layers.items():
            out[name] = {"path": "hooks", "reason": None, "batch_axis": info.batch_axis}
        for members in self.ties.values():
            for info in members:
                out[info.name] = {"path": "hooks", "reason": tie_note(members), "batch_axis": info.batch_axis}
        for name, reason in self.rejected.items():
            out[name] = {"path": "func", "reason": reason, "batch_axis": None}
        return out

    def captured(self) -> dict[str, LayerInfo]:
        """Every layer whose inputs and output gradients the hook path records: the planned
        layers and the members of each tie."""
        return {**self.layers, **{info.name: info for members in self.ties.values() for info in members}}

    def drop(self, module: str, reason: str) -> str:
        """Sends a planned layer, or the whole tie that ``module`` belongs to, to torch.func
        with ``reason``; returns the name it is reported under (a tie's owner)."""
        for weight, members in list(self.ties.items()):
            if module in (info.name for info in members):
                del self.ties[weight]
                module = members[0].name
                break
        else:
            del self.layers[module]
        self.rejected[module] = reason
        return module


def tie_params(members: tuple[LayerInfo, ...]) -> tuple[str, ...]:
    """The parameters a tie covers: the tied weight, then each member's own bias."""
    return (members[0].weight, *(info.bias for info in members if info.bias is not None))


def tie_note(members: tuple[LayerInfo, ...]) -> str:
    """``"tied: contributions of wte (Embedding) and lm_head (Linear) summed"``."""
    names = [f"{info.name or '<root>'} ({type(info.module).__name__})" for info in members]
    return f"tied: contributions of {', '.join(names[:-1])} and {names[-1]} summed"


# a layer fails the self-check when ‖hook − autograd‖ > √eps · (‖autograd‖ + ‖hook‖ + FLOOR · ‖all‖)
SELF_CHECK_FLOOR = 1e-2

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def plan_layers(
    model: nn.Module,
    task: Task,
    layout: ParameterLayout,
    candidates: dict[str, LayerInfo],
    batch: Any | Callable[[], Any],
    self_check: bool = True,
) -> LayerPlan:
    """Decides which ``candidates`` the hook path computes exactly (see the module docstring).

    Args:
        model, task, layout: the model, how batches are read, the attributed parameters.
        candidates: layers the caller can capture (e.g. :func:`~.capture.hookable_layers`).
        batch: one batch of the data (the first training batch at fit), or a function that
            returns it, called only when the plan is not cached (no extra loader pass).
        self_check: also compare per-example gradients with torch.func on ``batch``.
    """
    # structure (module and parameter objects, as re-tying or swapping a module replaces them),
    # train/eval state, layout, candidates and task: anything a plan depends on but the data
    structure = tuple((id(m), m.training) for m in model.modules()) + tuple(id(p) for p in model.parameters())
    key = (structure, layout.names, tuple(candidates), type(task).__qualname__, repr(task), self_check)
    cached = _CACHE.setdefault(model, {})
    if key in cached:
        return cached[key]
    if callable(batch):
        batch = batch()
    plan = LayerPlan({}, {})
    if candidates:
        shapes, uses = probe(model, task, batch, candidates, layout)
        for name, info in candidates.items():
            foreign = foreign_uses(info, uses)
            if foreign:
                members, reason = tie(model, info, foreign, uses, shapes, layout)
                if members is not None:
                    plan.ties[info.weight] = members
                    continue
                axis = None
            else:
                axis, reason = batch_axis(info, *shapes[name])
            if reason is None:
                plan.layers[name] = dataclasses.replace(info, batch_axis=axis)
            else:
                plan.rejected[name] = reason
        _confirm_shared(model, task, batch, plan)
        if self_check and (plan.layers or plan.ties):
            _self_check(model, task, batch, plan)
            plan.self_checked = True
    cached[key] = plan
    return plan

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
    """Compares hook-path and torch.func per-example gradients on two examples of ``batch``
    (a tied weight: the sum of its members' contributions)."""
    n = task.num_examples(batch)
    rows = sorted({0, n - 1})
    while plan.layers or plan.ties:
        try:
            hooks = _hook_grads(model, task, batch, plan.captured(), rows)
            break
        except BatchAxisError as error:  # the real batch contradicts the probe: that layer out
            plan.drop(error.layer, f"its batch axis does not hold on the data ({error})")
    groups = {name: [p for p in (info.weight, info.bias) if p is not None] for name, info in plan.layers.items()}
    groups.update({members[0].name: list(tie_params(members)) for members in plan.ties.values()})
    if not groups:
        return
    names = [p for params in groups.values() for p in params]
    shapes = dict(zip(names, (model.get_parameter(p).shape for p in names)))
    sub_layout = ParameterLayout(tuple(names), tuple(shapes[p] for p in names))
    exact = _autograd_grads(model, task, take_examples(task, batch, torch.tensor(rows)), sub_layout)
    total = math.sqrt(sum(float(exact[p].double().pow(2).sum()) for p in names))
    tol = max(math.sqrt(torch.finfo(exact[names[0]].dtype).eps), 1e-7)
    bad = {}
    for name, params in groups.items():
        for p in params:
            err = float((hooks[p].double() - exact[p].double()).norm())
            # rounding is relative to the whole gradient, not to a part that is exactly zero in
            # theory (the attention key bias: softmax ignores a shift), so the scale has a floor;
            # a layer whose gradient is below ~tol · SELF_CHECK_FLOOR of the whole cannot fail
            scale = float(exact[p].double().norm()) + float(hooks[p].double().norm()) + SELF_CHECK_FLOOR * total
            if err > tol * scale:
                bad[name] = err / max(float(exact[p].double().norm()), 1e-300)
                break
    for name, rel in bad.items():
        plan.drop(name, (
            f"the self-check found its hook-path gradients off by {rel:.2g} (relative) from "
            "autograd's (each example alone) on the first batch"
        ))
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
    """Per-example gradients of the ``rows`` examples, by the hook path, per parameter name
    (summed over the layers that share a parameter: the members of a tie)."""
    n = task.num_examples(batch)
    with LayerCapture(layers, batch_size=n) as cap:
        cap.backward(task.loss(model, batch))
    out: dict[str, torch.Tensor] = {}
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
            v = v.reshape(len(rows), *model.get_parameter(p).shape)
            out[p] = out[p] + v if p in out else v
    return out


__all__ = ["LayerPlan", "plan_layers", "tie_note", "tie_params", "PROBE_SIZES", "TIE_KINDS"]
