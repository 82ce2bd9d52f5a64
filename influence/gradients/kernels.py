"""Per-example gradient kernels of the hook path: one layer's factors to gradients and ghost
products.

For a layer with inputs ``a (B, T, d_in)`` and output gradients ``g (B, T, d_out)``
(:mod:`.capture`), the per-example weight gradient is ``Σ_t g_t a_tᵀ`` (Embedding: rows
``id_t`` get ``g_t``; LayerNorm: ``Σ_t g_t ⊙ x̂_t``; HF ``Conv1D``: ``Σ_t a_t g_tᵀ``, its weight
stored ``(d_in, d_out)``). :func:`weight_grads` forms it (into a reused buffer, or added to one);
:func:`layer_dot` and :func:`layer_sq_norms` give the ghost inner products
``⟨∇W_i, ∇W_j⟩ = ⟨A_iA_jᵀ, G_iG_jᵀ⟩`` and norms without forming any gradient.
"""

from __future__ import annotations

import torch

from .capture import LayerInfo, tokens_in


class LayerFactors:
    """One layer's factors for a batch: ``a (B, T, d_in)`` (ids for Embedding), ``g (B, T, d_out)``.

    A Conv2d may instead be given its raw input ``x (B, C, H, W)``: its patches ``a`` are then
    made on first access only, and :func:`weight_grads` uses a grouped convolution on ``x``.
    """

    __slots__ = ("info", "_a", "g", "x")

    def __init__(self, info: LayerInfo, a: torch.Tensor | None, g: torch.Tensor, x: torch.Tensor | None = None):
        if a is None and x is None:
            raise ValueError("LayerFactors needs the tokens a or the raw input x.")
        self.info, self._a, self.g, self.x = info, a, g, x

    @property
    def a(self) -> torch.Tensor:
        if self._a is None:
            self._a = tokens_in(self.info, self.x)
        return self._a


def _conv_weight_grads(f: LayerFactors, out: torch.Tensor | None) -> torch.Tensor:
    """Per-example Conv2d weight gradients ``(B, C_out, C_in·kh·kw)`` from the raw input.

    The batch is folded into the channels and the weight gradient of a convolution with
    ``groups = B`` is taken (what torch.func's batching rule does): one backward-weight kernel,
    no patch matrix.
    """
    m, x, g = f.info.module, f.x, f.g
    B, C, H, W = x.shape
    C_out = m.out_channels
    padding = (0, 0) if m.padding == "valid" else tuple(m.padding)
    Ho = (H + 2 * padding[0] - m.dilation[0] * (m.kernel_size[0] - 1) - 1) // m.stride[0] + 1
    Wo = g.shape[1] // Ho
    grad_out = g.transpose(1, 2).reshape(1, B * C_out, Ho, Wo)
    # only the weight's shape is read (no input gradient is asked for); a real, uninitialised
    # tensor rather than an expanded one, so that no backend can object to its strides
    weight_shape = m.weight.new_empty(B * C_out, C, *m.kernel_size)
    res = torch.ops.aten.convolution_backward(
        grad_out, x.reshape(1, B * C, H, W), weight_shape, None, list(m.stride), list(padding),
        list(m.dilation), False, [0, 0], B, [False, True, False],
    )[1].view(B, C_out, -1)
    return res if out is None else out.copy_(res)


def weight_grads(f: LayerFactors, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """Per-example weight gradients ``(B, d_out, d_in)`` in the weight's own layout (Embedding:
    ``(B, V, D)``; HF ``Conv1D``: ``(B, d_in, d_out)``), written into ``out`` or, with
    ``accumulate=True``, added to it (the members of a tie)."""
    info, g = f.info, f.g
    if accumulate and info.kind in ("conv2d", "layernorm"):
        return out.add_(weight_grads(f).view(out.shape))
    if info.kind == "conv2d" and f._a is None:
        return _conv_weight_grads(f, out)
    a = f.a
    B, T = g.shape[0], g.shape[1]
    if info.kind == "embedding":
        V, D = info.module.num_embeddings, info.d_out
        if out is None:
            out = torch.zeros(B, V, D, dtype=g.dtype, device=g.device)
        elif not accumulate:
            out.zero_()
        # one accumulating scatter into (example, id) rows: works on a strided view of a (B, P)
        # buffer too, with no per-example loop and no boolean indexing (a host sync on CUDA);
        # padding tokens are zeroed rather than dropped, for the same reason
        if info.module.padding_idx is not None:
            g = g * (a != info.module.padding_idx).unsqueeze(-1).to(g.dtype)
        examples = torch.arange(B, device=a.device).repeat_interleave(T)
        out.index_put_((examples, a.reshape(-1)), g.reshape(-1, D), accumulate=True)
        return out
    if info.kind == "layernorm":
        res = (g * a).sum(1)
        return res if out is None else out.copy_(res.view(out.shape))
    left, right = (a, g) if info.transposed else (g, a)  # HF Conv1D: weight stored (d_in, d_out)
    if accumulate:
        return out.addcmul_(left.transpose(1, 2), right) if T == 1 else out.baddbmm_(left.transpose(1, 2), right)
    if T == 1:
        return torch.mul(left.transpose(1, 2), right, out=out) if out is not None else left.transpose(1, 2) * right
    return torch.bmm(left.transpose(1, 2), right, out=out) if out is not None else torch.bmm(left.transpose(1, 2), right)


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n, T, d) × (m, S, d) → (n, T, m, S)`` inner products."""
    n, T, d = x.shape
    m, S, _ = y.shape
    return (x.reshape(n * T, d) @ y.reshape(m * S, d).T).reshape(n, T, m, S)


def _input_gram(info: LayerInfo, a: torch.Tensor, b: torch.Tensor, dtype) -> torch.Tensor:
    if info.kind != "embedding":
        return _gram(a, b)
    same = a[:, :, None, None] == b[None, None]
    if info.module.padding_idx is not None:
        same = same & (a != info.module.padding_idx)[:, :, None, None]
    return same.to(dtype)


def layer_dot(x: LayerFactors, y: LayerFactors) -> torch.Tensor:
    """Ghost inner products ``(n, m)`` of one layer's weight (and bias) gradients."""
    info = x.info
    if info.kind == "layernorm":
        out = weight_grads(x) @ weight_grads(y).T
    else:
        out = (_input_gram(info, x.a, y.a, x.g.dtype) * _gram(x.g, y.g)).sum((1, 3))
    if info.bias is not None:
        out = out + x.g.sum(1) @ y.g.sum(1).T
    return out


def layer_sq_norms(x: LayerFactors) -> torch.Tensor:
    """Ghost norms ``‖∇_layer ℓ_b‖²``, shape ``(B,)``, without forming the gradients."""
    info, a, g = x.info, x.a, x.g
    if info.kind == "layernorm":
        out = weight_grads(x).pow(2).sum(1)
    elif g.shape[1] == 1 and info.kind != "embedding":
        out = a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    else:
        gg = torch.bmm(g, g.transpose(1, 2))
        if info.kind == "embedding":
            aa = (a[:, :, None] == a[:, None, :]).to(g.dtype)
            if info.module.padding_idx is not None:
                aa = aa * (a != info.module.padding_idx)[:, :, None]
        else:
            aa = torch.bmm(a, a.transpose(1, 2))
        out = (aa * gg).sum((1, 2))
    if info.bias is not None:
        out = out + g.sum(1).pow(2).sum(1)
    return out


def matrix_shape(info: LayerInfo) -> tuple[int, ...]:
    """A layer's per-example weight gradient as :func:`weight_grads` writes it (no batch)."""
    if info.kind in ("layernorm", "embedding", "conv1d"):  # the weight's own layout
        return tuple(info.module.weight.shape)
    return (info.d_out, info.d_in)  # Conv2d: (C_out, C_in·kh·kw)
