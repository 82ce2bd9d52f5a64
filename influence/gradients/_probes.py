"""The probes of the layer plan (:mod:`.plan`): where each attributed parameter is used, the
shapes of each layer's calls at two batch sizes, and what they say.

- :func:`probe`: forwards at :data:`PROBE_SIZES` examples; the first under a
  :class:`~torch.overrides.TorchFunctionMode` that records, per attributed parameter, every
  module whose forward applied a torch function to it (metadata reads such as ``.shape`` aside);
- :func:`batch_axis`: a layer's batch axis from its calls' shapes;
- :func:`tie`: whether a weight used by several layers can be summed on the hook path.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..params import ParameterLayout
from .capture import LayerInfo, layer_kind, unsupported_reason
from .functional import check_per_example, take_examples

PROBE_SIZES = (2, 3)
TIE_KINDS = ("linear", "embedding", "conv2d", "conv1d")  # layers a tie can sum over

# Tensor attributes and methods that read metadata only: no value flows, no gradient
_METADATA = frozenset(
    "shape dtype device ndim requires_grad is_cuda is_sparse is_quantized is_meta layout names "
    "is_leaf grad_fn grad data _version itemsize nbytes is_mps is_nested is_mkldnn is_complex "
    "size dim numel nelement ndimension stride storage_offset element_size is_floating_point "
    "is_contiguous data_ptr get_device detach __len__ __hash__ untyped_storage".split()
)


class _UseRecorder(TorchFunctionMode):
    """Records, per watched parameter, the modules whose forward applied a torch function to it."""

    def __init__(self, watched: dict[int, str], modules: dict[int, str]):
        super().__init__()
        self.watched = watched  # id(parameter) -> its name in the layout
        self.modules = modules  # id(module) -> name
        self.stack: list[nn.Module] = []
        # parameter -> {innermost running module's name (None: no module): (its class, function)}
        self.uses: dict[str, dict[str | None, tuple[str, str]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_flatten((args, kwargs))[0]:
            name = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if name is None or _metadata_only(func):
                continue
            running = self.stack[-1] if self.stack else None
            where = None if running is None else self.modules.get(id(running), "?")
            self.uses.setdefault(name, {}).setdefault(where, (type(running).__name__, _func_name(func)))
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


def probe(model, task, batch, candidates, layout):
    """Input/output shapes of every call of the candidates and of every other layer of a kind
    a tie can sum over, at the two probe sizes, and where each attributed parameter is used."""
    n = task.num_examples(batch)
    modules = {id(m): name for name, m in model.named_modules()}
    watched = {id(t): name for name, t in layout.tensors(model).items()}
    recorder = _UseRecorder(watched, modules)
    traced = {name: m for name, m in model.named_modules() if name in candidates or layer_kind(m) in TIE_KINDS}
    records: dict[str, list] = {name: [] for name in traced}

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
    for name, module in traced.items():
        handles.append(module.register_forward_hook(record(name)))
    shapes: dict[str, list] = {name: [] for name in traced}
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
                for name in traced:
                    shapes[name].append(list(records[name]))
    finally:
        for h in handles:
            h.remove()
    return {name: tuple(s) for name, s in shapes.items()}, recorder.uses


def foreign_uses(info: LayerInfo, uses: dict) -> dict[str, dict]:
    """``{parameter: {module: (class, function)}}``: the uses of the layer's parameters by
    anything but the layer itself (``None``: code outside any module)."""
    out = {}
    for p in (info.weight, info.bias):
        elsewhere = {where: v for where, v in uses.get(p, {}).items() if where != info.name}
        if p is not None and elsewhere:
            out[p] = elsewhere
    return out


def _place(where: str | None, kind: str) -> str:
    return "code outside any module" if where is None else f"{where or '<root>'} ({kind})"


def _misuse(role: str, where: str | None, kind: str, func: str) -> str:
    return f"its {role} is also used by {_place(where, kind)} via {func} (tied or functional use)"


def tie(model, info: LayerInfo, foreign: dict, uses: dict, shapes: dict, layout: ParameterLayout):
    """``(members, None)`` when the hook path can sum the candidate's weight over every layer
    that uses it, else ``(None, reason)``. ``foreign``: :func:`foreign_uses` of the candidate.

    Every use must be by a supported layer (:data:`TIE_KINDS`) that holds the weight as its
    own ``weight``, whose bias is absent or attributed and used by it alone, and whose batch
    axis is traced (not a shared leading 1); the members are the candidate, then those layers
    in the order they ran.
    """
    first = next(iter(foreign))
    where, (kind, func) = next(iter(foreign[first].items()))
    misuse = _misuse("weight" if first == info.weight else "bias", where, kind, func)
    weight = model.get_parameter(info.weight)
    attributed = {}
    for name, t in layout.tensors(model).items():
        attributed.setdefault(id(t), []).append(name)
    if info.bias in foreign or info.kind not in TIE_KINDS or len(attributed[id(weight)]) > 1:
        return None, misuse  # (a weight attributed under two names is left to torch.func)
    modules = dict(model.named_modules())
    members = [info]
    for where, (kind, func) in foreign[info.weight].items():
        module = modules.get(where) if where not in (None, "?") else None
        if module is None or layer_kind(module) not in TIE_KINDS or unsupported_reason(module) is not None \
                or getattr(module, "weight", None) is not weight:
            return None, _misuse("weight", where, kind, func)
        tied = f"its weight is tied with {where or '<root>'} ({kind}), whose bias"
        bias = getattr(module, "bias", None)
        bias_name = None if bias is None else (f"{where}.bias" if where else "bias")
        if bias is not None and attributed.get(id(bias)) != [bias_name]:
            return None, (f"{tied} {bias_name} is not attributed (the hook path sums a tie over "
                          "layers whose parameters are all attributed)")
        elsewhere = {k: v for k, v in uses.get(bias_name, {}).items() if k != where}
        if elsewhere:
            other, (other_kind, other_func) = next(iter(elsewhere.items()))
            return None, f"{tied} is also used by {_place(other, other_kind)} via {other_func}"
        members.append(LayerInfo(where, module, layer_kind(module), info.weight, bias_name))
    out = []
    for member in members:
        axis, reason = batch_axis(member, *shapes[member.name])
        if reason is None and axis is not None:
            out.append(dataclasses.replace(member, batch_axis=axis))
            continue
        reason = reason or "its input is shared by the batch (leading dimension 1)"
        if member is info:
            others = ", ".join(f"{m.name or '<root>'} ({type(m.module).__name__})" for m in members[1:])
            return None, f"its weight is tied with {others}, and its own batch axis is not traced: {reason}"
        return None, (f"its weight is tied with {member.name or '<root>'} ({type(member.module).__name__}), "
                      f"whose batch axis is not traced: {reason}")
    return tuple(out), None


def _shape(t) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def batch_axis(info: LayerInfo, calls1: list, calls2: list) -> tuple[int | None, str | None]:
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
