"""Layer inputs and output gradients of ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` and
HuggingFace ``Conv1D``.

For these layers the per-example gradient factors through what flows in and out of the layer.
With ``a_{t}`` the layer input at token ``t`` (for Conv2d: an unfolded input patch, Grosse &
Martens 2016) and ``g_{t} = ∂ℓ/∂s_t`` the gradient of the example's loss with respect to the
layer output ``s_t``::

    ∇W ℓ = Σ_t g_t a_tᵀ        ∇b ℓ = Σ_t g_t

and for an Embedding (``a_t`` one-hot of the token id) ``∇W ℓ = Σ_t onehot(id_t) g_tᵀ``.

HuggingFace's ``Conv1D`` (GPT-2's projections) is a linear layer ``s = a W + b`` whose weight is
stored **transposed**, ``(d_in, d_out)``: its kind is ``"conv1d"``, it captures exactly like a
Linear, and its weight gradient is ``Σ_t a_t g_tᵀ`` (:attr:`LayerInfo.transposed` is True). It
is recognised by class name and module (``transformers...Conv1D``), so transformers is never
imported here.

:class:`LayerCapture` records ``a`` and ``g`` for every supported layer in one forward and one
backward pass that asks autograd only for gradients with respect to layer outputs, so **no
parameter gradient is computed**. Kronecker-factored curvatures (covariances of ``a`` and
``g``) and the fast per-example gradient path are built on it.

Shapes (``B`` examples, ``T`` tokens per example; ``T = 1`` for a plain ``(B, d)`` input; a
layer called several times in one forward contributes all calls' tokens):

- ``inputs[name]``: ``(B, T, d_in)``, or ``(B, T)`` token ids for an Embedding;
- ``output_grads[name]``: ``(B, T, d_out)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import InfluenceError
from ..params import ParameterLayout, module_name

LAYER_KINDS = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}

# Layers of optional libraries, matched by (module prefix, class name) so that importing
# this module never imports them.
EXTERNAL_LAYER_KINDS = {("transformers", "Conv1D"): "conv1d"}


class BatchAxisError(InfluenceError):
    """A captured layer's output does not have the batch size on its batch axis."""

    def __init__(self, message: str, layer: str):
        super().__init__(message)
        self.layer = layer


def layer_kind(module: nn.Module) -> str | None:
    """The capture kind of a module (exact type match), or ``None`` when unsupported."""
    kind = LAYER_KINDS.get(type(module))
    if kind is None:
        cls = type(module)
        kind = EXTERNAL_LAYER_KINDS.get((cls.__module__.partition(".")[0], cls.__name__))
    return kind


@dataclass(frozen=True)
class LayerInfo:
    """A supported layer whose weight is attributed.

    ``batch_axis`` is the axis of the layer's inputs and outputs that indexes the examples of a
    batch: ``0`` (batch-first, the default), another axis (e.g. ``1`` for PyTorch's default
    sequence-first ``(T, B, d)`` transformer layers), or ``None`` for an input shared by the
    whole batch with a leading dimension of 1 (e.g. GPT-2's ``(1, T)`` position ids), whose
    output is expanded to one copy per example. It is decided from how a batch flows through
    the model (:func:`influence.gradients.plan.plan_layers`), never from shape equalities.
    """

    name: str
    module: nn.Module
    kind: str
    weight: str
    bias: str | None
    batch_axis: int | None = 0

    @property
    def transposed(self) -> bool:
        """True when the weight is stored ``(d_in, d_out)`` (HuggingFace ``Conv1D``)."""
        return self.kind == "conv1d"

    @property
    def d_in(self) -> int:
        m = self.module
        if self.kind == "conv1d":
            return m.weight.shape[0]
        if self.kind == "linear":
            return m.in_features
        if self.kind == "conv2d":
            return m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        return m.num_embeddings

    @property
    def d_out(self) -> int:
        m = self.module
        if self.kind == "conv1d":
            return m.weight.shape[1]
        if self.kind == "linear":
            return m.out_features
        if self.kind == "conv2d":
            return m.out_channels
        return m.embedding_dim


@dataclass(frozen=True)
class NormInfo(LayerInfo):
    """A 1-D elementwise-affine ``nn.LayerNorm`` (``kind == "layernorm"``): ``∇γ = Σ_t g_t ⊙ x̂_t``,
    ``∇β = Σ_t g_t`` with ``x̂`` the normalised input (captured in place of the input)."""

    @property
    def d_in(self) -> int:
        return self.module.normalized_shape[0]

    @property
    def d_out(self) -> int:
        return self.module.normalized_shape[0]


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a Linear/Conv2d/Embedding cannot use the hook path (``None`` when it can)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped convolution (groups != 1)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r}"
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return "max_norm renormalises weights in place"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq couples the examples of a batch"
    return None


def supported_layers(
    model: nn.Module, layout: ParameterLayout, include_transposed: bool = False
) -> dict[str, LayerInfo]:
    """The Linear/Conv2d/Embedding modules whose weight (and bias, if any) are attributed.

    A module whose weight is attributed but whose bias is not (or the reverse) is left to the
    generic path, so that every attributed parameter is covered exactly once.

    Args:
        include_transposed: also return layers whose weight is stored ``(d_in, d_out)``
            (HuggingFace ``Conv1D``, :attr:`LayerInfo.transposed`). Off by default so that
            code written for ``(d_out, d_in)`` weights never misreads them; callers that handle
            ``info.transposed`` (as :func:`layer_grads` does) pass True.
    """
    attributed = set(layout.names)
    layers: dict[str, LayerInfo] = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or unsupported_reason(module) is not None:
            continue
        if kind == "conv1d" and not include_transposed:
            continue
        prefix = f"{name}." if name else ""
        weight = prefix + "weight"
        bias = prefix + "bias" if getattr(module, "bias", None) is not None else None
        if weight not in attributed:
            continue
        if bias is not None and bias not in attributed:
            continue
        layers[name] = LayerInfo(name, module, kind, weight, bias)
    return layers


def hookable_layers(model: nn.Module, layout: ParameterLayout) -> dict[str, LayerInfo]:
    """Every layer the hook path can capture, in module order: :func:`supported_layers`
    (HuggingFace ``Conv1D`` included) plus 1-D elementwise-affine LayerNorms whose parameters
    are all attributed. Consumers keep the kinds they handle."""
    layers = dict(supported_layers(model, layout, include_transposed=True))
    attributed = set(layout.names)
    for name, m in model.named_modules():
        if type(m) is not nn.LayerNorm or not m.elementwise_affine or len(m.normalized_shape) != 1:
            continue
        prefix = f"{name}." if name else ""
        weight, bias = prefix + "weight", (prefix + "bias" if m.bias is not None else None)
        if weight in attributed and (bias is None or bias in attributed):
            layers[name] = NormInfo(name, m, "layernorm", weight, bias)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(layers.items(), key=lambda kv: order[kv[0]]))


def tokens_in(info: LayerInfo, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as ``(B, T, d_in)`` tokens (Conv2d: patches; Embedding: ``(B, T)`` ids)."""
    m = info.module
    if info.kind in ("linear", "conv1d"):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if info.kind == "conv2d":
        padding = (0, 0) if m.padding == "valid" else m.padding
        return unfold_patches(x, m.kernel_size, m.dilation, padding, m.stride)
    return x.reshape(x.shape[0], -1)


def unfold_patches(x: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """``F.unfold(...).transpose(1, 2)``, i.e. ``(B, H_out·W_out, C·kh·kw)``, by one strided copy.

    Same values and order as ``F.unfold`` (channel-major patches, row-major positions), but
    already token-major (contiguous) for the GEMMs and row covariances that follow. (torch 2.13
    CPU: in a full capture pass this costs the same as im2col plus GEMMs on its transposed view.)
    """
    ph, pw = padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    B, C, H, W = x.shape
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    s = x.stride()
    patches = x.as_strided((B, Ho, Wo, C, kh, kw), (s[0], s[2] * sh, s[3] * sw, s[1], s[2] * dh, s[3] * dw))
    return patches.reshape(B, Ho * Wo, C * kh * kw)


def _tokens_out(info: LayerInfo, s: torch.Tensor) -> torch.Tensor:
    if info.kind == "conv2d":
        return s.flatten(2).transpose(1, 2)
    return s.reshape(s.shape[0], -1, s.shape[-1])


class LayerCapture:
    """Records inputs and output gradients of the given layers over one forward/backward.

    Usage::

        with LayerCapture(layers) as cap:
            losses = task.loss(model, batch)        # (B,) forward with hooks
            cap.backward(losses)                    # gradients w.r.t. layer outputs only
        a, g = cap.inputs["fc1"], cap.output_grads["fc1"]

    ``backward`` may be given any per-example scalar function of the forward (e.g. the loss
    with sampled targets for the true Fisher). With ``batch_size`` set, a layer whose input is
    shared by the whole batch (first dimension 1, e.g. GPT-2's ``(1, T)`` position ids) has its
    output expanded to ``batch_size`` (the forward computes the same values), so that each
    example gets its own output gradient; any other first dimension raises. Set ``need_inputs=False`` to skip storing
    inputs (e.g. when only output gradients are needed). With ``raw_conv_inputs=True`` a Conv2d
    called once keeps its raw input ``(B, C, H, W)`` in ``raw_inputs[name]`` instead of its
    patches in ``inputs[name]`` (the patches are a ``C·kh·kw``-fold copy that per-example weight
    gradients by grouped convolution do not need; :func:`tokens_in` makes them on demand).
    """

    def __init__(
        self, layers: dict[str, LayerInfo], need_inputs: bool = True, batch_size: int | None = None,
        raw_conv_inputs: bool = False,
    ):
        self.layers = layers
        self.batch_size = batch_size
        self.need_inputs = need_inputs
        self.raw_conv_inputs = raw_conv_inputs
        self.raw_inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "LayerCapture":
        for name, info in self.layers.items():
            self._inputs[name], self._outputs[name] = [], []
            self._handles.append(info.module.register_forward_hook(self._hook(name, info)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _hook(self, name: str, info: LayerInfo) -> Callable:
        def hook(module, args, output):
            x = args[0].detach()
            if info.kind == "layernorm":  # the normalised input x̂ plays the input's part
                x = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            if not output.requires_grad:  # nothing upstream needs a gradient: make it a leaf
                output = output.detach().requires_grad_(True)
            axis, n = info.batch_axis, self.batch_size
            if axis is None and n is not None and n > 1 and output.dim() > 0 and output.shape[0] == 1:
                # an input shared by the whole batch (e.g. GPT-2's (1, T) position ids): expand
                # it so that every example gets its own output, hence its own output gradient
                output = output.expand(n, *output.shape[1:])
                x = x.expand(n, *x.shape[1:])
            at = 0 if axis is None else axis
            if n is not None and (output.dim() <= at or output.shape[at] != n):
                raise BatchAxisError(
                    f"Layer {name!r} produced an output of shape {tuple(output.shape)} whose "
                    f"batch axis {at} does not have the batch size {n}: its gradient "
                    "cannot be split per example from its inputs and outputs. Feed it "
                    "inputs whose batch axis does not change between batches, or leave it "
                    "out of the attributed parameters.",
                    layer=name,
                )
            if at:  # e.g. sequence-first (T, B, d): examples first for the factors
                x = x.movedim(at, 0)
            if self.need_inputs:
                raw = self.raw_conv_inputs and info.kind == "conv2d"
                self._inputs[name].append(x if raw else tokens_in(info, x))
            self._outputs[name].append(output)
            return output

        return hook

    def backward(
        self, losses: torch.Tensor, retain_graph: bool = False, grad_outputs: torch.Tensor | None = None
    ) -> None:
        """Gradients of ``losses.sum()`` with respect to each captured layer output.

        With ``retain_graph=True`` the forward graph is kept, so that ``backward`` can be called
        again on another function of the same forward (e.g. several sampled targets for the true
        Fisher); each call replaces ``output_grads``.

        With ``grad_outputs`` of shape ``(K, *losses.shape)``, ``losses`` may be any tensor of
        the forward (e.g. the model outputs) and the ``K`` vector-Jacobian products
        ``⟨losses, grad_outputs[k]⟩`` are taken, by one batched backward
        (``is_grads_batched``) or, where an operation has no batching rule, one backward per
        ``k``: ``output_grads[name]`` then holds ``(K·B, T, d_out)``, row ``k·B + b`` for
        vector ``k`` and example ``b``.
        """
        names = [n for n in self.layers if self._outputs.get(n)]
        flat_outputs = [o for n in names for o in self._outputs[n]]
        if grad_outputs is None:
            grads = torch.autograd.grad(
                losses.sum(), flat_outputs, allow_unused=True, retain_graph=retain_graph
            )
        else:
            grads = _batched_vjp(losses, flat_outputs, grad_outputs, retain_graph)
        k = 0
        for name in names:
            info = self.layers[name]
            parts = []
            for out in self._outputs[name]:
                if grad_outputs is None:
                    g = grads[k] if grads[k] is not None else torch.zeros_like(out)
                    if info.batch_axis:
                        g = g.movedim(info.batch_axis, 0)
                else:  # (K, ...) → examples of all K vectors along the batch axis, (K·B, ...)
                    g = grads[k] if grads[k] is not None else out.new_zeros(len(grad_outputs), *out.shape)
                    g = g.movedim((info.batch_axis or 0) + 1, 1).flatten(0, 1)
                parts.append(_tokens_out(info, g.detach()))
                k += 1
            self.output_grads[name] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            if self.need_inputs:
                parts_in = self._inputs[name]
                if self.raw_conv_inputs and info.kind == "conv2d":
                    if len(parts_in) == 1:
                        self.raw_inputs[name] = parts_in[0]
                        continue
                    parts_in = [tokens_in(info, x) for x in parts_in]
                self.inputs[name] = torch.cat(parts_in, dim=1) if len(parts_in) > 1 else parts_in[0]


def _batched_vjp(outputs: torch.Tensor, inputs: list[torch.Tensor], vectors: torch.Tensor, retain_graph: bool):
    """``[(K, *x.shape)]``: the vector-Jacobian products of ``vectors`` (``(K, *outputs.shape)``)
    through ``outputs`` to each ``x`` of ``inputs`` (``None`` where ``x`` is unused)."""
    try:
        with warnings.catch_warnings():  # vmap's notice of a slow batching rule: still exact
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return torch.autograd.grad(
                outputs, inputs, vectors, allow_unused=True, retain_graph=True, is_grads_batched=True
            )
    except (RuntimeError, NotImplementedError):  # an operation without a vmap rule: one at a time
        pass
    per_vector = [
        torch.autograd.grad(outputs, inputs, v, allow_unused=True, retain_graph=retain_graph or k < len(vectors) - 1)
        for k, v in enumerate(vectors)
    ]
    return [
        None if column[0] is None else torch.stack(column) for column in zip(*per_vector)
    ]


def layer_grads(info: LayerInfo, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Materialised per-example gradients ``{param_name: (B, *shape)}`` from ``a`` and ``g``."""
    m = info.module
    if info.kind == "layernorm":
        out = {info.weight: (g * a.reshape(*g.shape)).sum(1)}
        if info.bias is not None:
            out[info.bias] = g.sum(dim=1)
        return out
    if info.kind == "embedding":
        onehot = F.one_hot(a, m.num_embeddings).to(g.dtype)
        if m.padding_idx is not None:
            onehot[..., m.padding_idx] = 0
        out = {info.weight: torch.einsum("btv,btd->bvd", onehot, g)}
    elif info.transposed:  # Conv1D: weight (d_in, d_out)
        out = {info.weight: torch.einsum("bti,bto->bio", a, g)}
    else:
        weight = torch.einsum("bto,bti->boi", g, a)
        out = {info.weight: weight.reshape(g.shape[0], *m.weight.shape)}
    if info.bias is not None:
        out[info.bias] = g.sum(dim=1)
    return out


__all__ = ["BatchAxisError", "LayerCapture", "LayerInfo", "NormInfo", "hookable_layers", "layer_grads", "layer_kind", "module_name", "supported_layers", "unsupported_reason"]
