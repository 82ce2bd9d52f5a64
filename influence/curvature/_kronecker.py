"""Kronecker factors of Linear, Conv2d, Embedding and HF Conv1D layers, collected by hooks.

For a layer with inputs ``a_t`` (bias as a homogeneous coordinate: ``a_t ← [a_t, 1]``; Conv2d:
unfolded patches) and output gradients ``s_t = ∂ℓ/∂(output_t)`` at tokens ``t`` of example
``i`` (spatial locations for Conv2d, sequence positions for language models, 1 for plain
inputs), the per-example gradient of the weight matrix ``W (d_out × d_in)`` is
``G_i = Σ_t s_t a_tᵀ``. K-FAC approximates that layer's block of the Fisher of the mean loss,
``F = (1/N) Σ_i vec(G_i) vec(G_i)ᵀ``, by ``S ⊗ A`` (row-major ``vec``) with

- ``A = (1/M) Σ_i Σ_t a_t a_tᵀ``: mean over the ``M`` non-padding tokens (per token);
- ``S = (1/(N·K)) Σ_i Σ_k Σ_t s_t s_tᵀ``: mean over the ``N`` examples (and ``K`` sampled
  targets for the true Fisher) of the token sums (per example); for the expected Fisher the
  ``K`` square-root columns of an example are summed instead,
  ``S = (1/N) Σ_i Σ_k Σ_t s_t s_tᵀ`` (see :mod:`influence.curvature._fisher`).

This is exact whenever ``a`` is the same for every token and example (``A`` of rank one) or
there is one example with one token, and under K-FAC's independence assumption it matches
``F``'s scale for any ``T`` (Grosse & Martens 2016 for Conv2d). Padding tokens (a batch's
``attention_mask == 0``) are left out of ``A`` and ``M``. For an Embedding, ``a_t`` is the one-hot
of the token id, so ``A`` is diagonal (token frequencies; ``padding_idx`` excluded, its gradient
is zero) and the block is ``A ⊗ S`` over the ``(num_embeddings, dim)`` weight. HuggingFace's
``Conv1D`` (GPT-2) is a Linear whose weight is stored ``(d_in, d_out)``: same factors, and
:class:`KroneckerBlock` reads its weight coordinates transposed.

Statistics are **sums plus counts** (``"<layer>/A"``, ``"<layer>/A_count"``, ``"<layer>/S"``,
``"<layer>/S_count"``, float64), one batch at a time (:func:`factor_statistics`,
:func:`correction_statistics`), every key present for every batch, so that the fitting driver
adds them over batches and processes (all-reduce) before :func:`kronecker_blocks` normalises
and eigendecomposes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..gradients.capture import LayerCapture, LayerInfo
from ..draws import TargetDraws
from ..params import ParameterLayout
from ..tasks import Task
from ._eigh import factor_eigh
from ._fisher import fisher_backward, terms_per_example

F64 = torch.float64


def token_mask(batch: Any) -> torch.Tensor | None:
    """``(B, T)`` boolean mask of non-padding tokens (``attention_mask``), or ``None``."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return None


def _layer_mask(mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The mask for a layer with ``T`` tokens (a multiple when the layer ran several times)."""
    if mask is None or T % mask.shape[1]:
        return None
    return mask.repeat(1, T // mask.shape[1])


def homogeneous(info: LayerInfo, a: torch.Tensor) -> torch.Tensor:
    """Appends the bias coordinate 1 to Linear/Conv2d inputs ``(..., d_in) → (..., d_in+1)``."""
    if info.bias is None:
        return a
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def input_statistics(info: LayerInfo, a: torch.Tensor, mask: torch.Tensor | None):
    """``(Σ a aᵀ or token counts, number of tokens)`` of one batch, float64."""
    m = info.module
    keep = _layer_mask(mask, a.shape[1])
    if info.kind == "embedding":
        ids = a[keep] if keep is not None else a.reshape(-1)
        counts = torch.bincount(ids.reshape(-1), minlength=m.num_embeddings).to(F64)
        if m.padding_idx is not None:
            counts[m.padding_idx] = 0
        return counts, ids.numel()
    a = homogeneous(info, a)
    rows = a[keep] if keep is not None else a.reshape(-1, a.shape[-1])
    return (rows.T @ rows).to(F64), rows.shape[0]


def _zero_statistics(info: LayerInfo, device) -> dict[str, torch.Tensor]:
    """The statistics of a layer that did not run in a batch (all zeros, fixed shapes)."""
    d_a = info.d_in + (info.bias is not None and info.kind != "embedding")
    A_shape = (d_a,) if info.kind == "embedding" else (d_a, d_a)
    zero = torch.zeros((), dtype=F64, device=device)
    return {
        f"{info.name}/A": torch.zeros(A_shape, dtype=F64, device=device),
        f"{info.name}/A_count": zero.clone(),
        f"{info.name}/S": torch.zeros(info.d_out, info.d_out, dtype=F64, device=device),
        f"{info.name}/S_count": zero.clone(),
    }


def factor_statistics(
    model: nn.Module,
    task: Task,
    batch: Any,
    layers: Mapping[str, LayerInfo],
    fisher_type: str,
    num_samples: int,
    draws: TargetDraws | None,
) -> dict[str, torch.Tensor]:
    """Sums and counts of ``A`` and ``S`` for every layer over one batch (one forward+backward).

    Only gradients with respect to layer outputs are computed (no parameter gradients). Every
    layer gets all four keys, zeros when it did not run in this batch, so that batches and
    ranks add key by key.
    """
    device = next(model.parameters()).device
    stats: dict[str, torch.Tensor] = {}
    for info in layers.values():
        stats.update(_zero_statistics(info, device))
    if not layers:
        return stats
    n = task.num_examples(batch)
    mask = token_mask(batch)
    with LayerCapture(dict(layers), batch_size=n) as cap:
        backward = fisher_backward(cap, model, task, batch, fisher_type, num_samples, draws)
        for k, _ in enumerate(backward):
            for name, info in layers.items():
                if name not in cap.output_grads:
                    continue  # the layer did not run in this forward
                s = cap.output_grads[name].reshape(-1, info.d_out)
                stats[f"{name}/S"] += (s.T @ s).to(device=device, dtype=F64)
                if k == 0:
                    stats[f"{name}/S_count"] += n * terms_per_example(fisher_type, num_samples)
                    A, tokens = input_statistics(info, cap.inputs[name], mask)
                    stats[f"{name}/A"] += A.to(device)
                    stats[f"{name}/A_count"] += tokens
    return stats


class KroneckerBlock:
    """One layer's ``(Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ`` on its weight (and bias) coordinates.

    Rows of ``(n, P)`` are viewed per example as ``X (d_out × d_in')`` (the weight matrix with
    the bias as last column; the transposed weight for an Embedding, whose ``Q_A`` is the
    identity, and for a HuggingFace ``Conv1D``, whose weight is stored ``(d_in, d_out)``). ``eigenvalues`` has shape ``(d_out, d_in')``: ``λ_S λ_Aᵀ`` for K-FAC, the
    corrected second moments for EK-FAC.
    """

    method = "kronecker"

    def __init__(self, info: LayerInfo, layout: ParameterLayout, Q_S, Q_A, eigenvalues):
        self.info = info
        self.names = (info.weight,) + ((info.bias,) if info.bias else ())
        slices = layout.slices()
        self.weight = slices[info.weight]
        self.bias = slices[info.bias] if info.bias else None
        self.Q_S, self.Q_A, self.eigenvalues = Q_S, Q_A, eigenvalues

    def to_matrix(self, X: torch.Tensor) -> torch.Tensor:
        """``(n, P) → (n, d_out, d_in')``."""
        n, info = X.shape[0], self.info
        if info.kind == "embedding" or info.transposed:  # weight stored (d_in, d_out)
            W = X[:, self.weight].reshape(n, -1, info.d_out).transpose(1, 2)
            if info.kind == "embedding":
                return W
        else:
            W = X[:, self.weight].reshape(n, info.d_out, -1)
        if self.bias is not None:
            W = torch.cat([W, X[:, self.bias][..., None]], dim=-1)
        return W

    def from_matrix(self, W: torch.Tensor, out: torch.Tensor) -> None:
        n = W.shape[0]
        if self.info.kind == "embedding":
            out[:, self.weight] = W.transpose(1, 2).reshape(n, -1)
            return
        if self.bias is not None:
            out[:, self.bias] = W[..., -1]
            W = W[..., :-1]
        if self.info.transposed:
            W = W.transpose(1, 2)
        out[:, self.weight] = W.reshape(n, -1)

    def rotate(self, W: torch.Tensor) -> torch.Tensor:
        """``Q_Sᵀ W Q_A``: into the Kronecker eigenbasis."""
        W = self.Q_S.T.to(W) @ W
        return W @ self.Q_A.to(W) if self.Q_A is not None else W

    def unrotate(self, W: torch.Tensor) -> torch.Tensor:
        """``Q_S W Q_Aᵀ``: back from the eigenbasis."""
        W = self.Q_S.to(W) @ W
        return W @ self.Q_A.T.to(W) if self.Q_A is not None else W

    def apply(self, X: torch.Tensor, out: torch.Tensor, damping: float, inverse: bool) -> None:
        lam = self.eigenvalues.to(X) + damping
        W = self.rotate(self.to_matrix(X))
        W = W / lam if inverse else W * lam
        self.from_matrix(self.unrotate(W), out)


def kronecker_blocks(
    stats: Mapping[str, torch.Tensor], layers: Mapping[str, LayerInfo], layout: ParameterLayout
) -> list[KroneckerBlock]:
    """Normalises the summed statistics and eigendecomposes them (float64): K-FAC blocks.

    The eigendecompositions skip rows and columns that are identically zero and fall back to
    other drivers when LAPACK fails (:func:`~influence.curvature._eigh.factor_eigh`).
    """
    blocks = []
    for name, info in layers.items():
        if f"{name}/A" not in stats:  # no statistics for this layer: its curvature is 0
            stats = {**stats, **_zero_statistics(info, "cpu")}
        A = stats[f"{name}/A"] / stats[f"{name}/A_count"].clamp_min(1)
        S = stats[f"{name}/S"] / stats[f"{name}/S_count"].clamp_min(1)
        lam_S, Q_S = factor_eigh(S, name, "S")
        if info.kind == "embedding":
            lam_A, Q_A = A, None
        else:
            lam_A, Q_A = factor_eigh(A, name, "A")
        blocks.append(KroneckerBlock(info, layout, Q_S, Q_A, torch.outer(lam_S, lam_A)))
    return blocks


def _rotated_factors(block: KroneckerBlock, a: torch.Tensor, s: torch.Tensor):
    """``Q_Sᵀ s_t`` and ``Q_Aᵀ a_t`` token by token (Linear/Conv/Conv1D; ``a`` with bias column)."""
    return s @ block.Q_S.to(s), homogeneous(block.info, a) @ block.Q_A.to(s)


def rotated_grads(block: KroneckerBlock, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-example gradients in the eigenbasis, ``Q_Sᵀ G_i Q_A`` ``(m·B, d_out, d_in')``.

    Computed from the captured factors as ``Σ_t (Q_Sᵀ s_t)(Q_Aᵀ a_t)ᵀ`` without forming the
    flat per-example gradient. ``s`` may hold ``m`` output gradients per example, ``(m·B, T,
    d_out)`` with row ``k·B + b`` for term ``k`` of example ``b`` (:func:`~influence.curvature.
    _fisher.fisher_backward`); ``a`` is ``(B, T, ...)`` and rotated once.
    """
    info = block.info
    m = s.shape[0] // a.shape[0]
    if info.kind == "embedding":  # scatter token rows: no (B, T, vocab) one-hot
        s = s @ block.Q_S.to(s)
        B, T, d = s.shape
        ids = a.repeat(m, 1) if m > 1 else a
        out = s.new_zeros(B, info.d_in, d).scatter_add_(1, ids[..., None].expand(B, T, d), s)
        if info.module.padding_idx is not None:
            out[:, info.module.padding_idx] = 0
        return out.transpose(1, 2)
    s, a = _rotated_factors(block, a, s)
    if m > 1:  # (m, B, d_out, T) @ (B, T, d_in'), broadcast over the terms
        return (s.unflatten(0, (m, -1)).transpose(-1, -2) @ a).flatten(0, 1)
    return torch.bmm(s.transpose(1, 2), a)


def squared_rotated_sum(block: KroneckerBlock, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Σ_b (Q_Sᵀ G_b Q_A)²`` (elementwise square) over a batch, ``(d_out, d_in')``, float64.

    ``s`` as in :func:`rotated_grads` (``m`` terms per example, each squared and summed).
    With one token per example (``T = 1``) the rotated gradient is the outer product
    ``(Q_Sᵀ s_b)(Q_Aᵀ a_b)ᵀ``, whose square is ``(Q_Sᵀ s_b)² ((Q_Aᵀ a_b)²)ᵀ``: the sum over the
    batch (and terms) is one GEMM of the squared rotated factors, and no per-example gradient is
    formed. Otherwise the rotated per-example gradients are formed (:func:`rotated_grads`).
    """
    if s.shape[1] == 1 and block.info.kind != "embedding":
        s1, a1 = _rotated_factors(block, a[:, 0], s[:, 0])
        s2 = s1.pow(2).unflatten(0, (-1, a1.shape[0])).sum(0)  # over the terms of each example
        return (s2.T @ a1.pow(2)).to(F64)
    return rotated_grads(block, a, s).pow(2).sum(0, dtype=F64)


def correction_statistics(
    model: nn.Module,
    task: Task,
    batch: Any,
    blocks: list[KroneckerBlock],
    fisher_type: str,
    num_samples: int,
    draws: TargetDraws | None,
) -> dict[str, torch.Tensor]:
    """EK-FAC's second pass over one batch: ``Σ_i Σ_k (Q_Sᵀ G_ik Q_A)²`` and counts per layer.

    Every block gets both keys (``"<layer>/corrections"``, ``"<layer>/corrections_count"``,
    float64), zeros when the layer did not run in this batch.
    """
    layers = {b.info.name: b.info for b in blocks}
    by_name = {b.info.name: b for b in blocks}
    device = next(model.parameters()).device
    stats: dict[str, torch.Tensor] = {}
    for b in blocks:
        stats[f"{b.info.name}/corrections"] = torch.zeros(b.eigenvalues.shape, dtype=F64, device=device)
        stats[f"{b.info.name}/corrections_count"] = torch.zeros((), dtype=F64, device=device)
    n = task.num_examples(batch)
    with LayerCapture(layers, batch_size=n) as cap:
        backward = fisher_backward(cap, model, task, batch, fisher_type, num_samples, draws)
        for k, _ in enumerate(backward):
            for name in cap.output_grads:
                sq = squared_rotated_sum(by_name[name], cap.inputs[name], cap.output_grads[name])
                stats[f"{name}/corrections"] += sq.to(device)
                if k == 0:
                    stats[f"{name}/corrections_count"] += n * terms_per_example(fisher_type, num_samples)
    return stats
