"""``TinyLM``: a pre-LayerNorm decoder-only transformer with ``nn.Linear`` projections.

Every projection (attention ``q``, ``k``, ``v``, ``o``; MLP ``fc1``, ``fc2``; ``lm_head``) is an
``nn.Linear`` so that the hook path and Kronecker curvatures cover it, and LoRA can wrap any of
them by name. Attention is written out (no fused kernels) so that ``torch.func.vmap`` runs it.
``forward(input_ids, attention_mask=None)`` returns logits ``(B, T, vocab_size)``; padded keys
(mask 0) are never attended to, and each position always attends to itself so that left
padding cannot produce an all-masked row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyLMConfig:
    vocab_size: int = 64
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 64
    max_len: int = 64
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Causal multi-head self-attention with a key padding mask."""

    def __init__(self, config: TinyLMConfig):
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(
                f"d_model={config.d_model} must be divisible by n_heads={config.n_heads}."
            )
        self.n_heads = config.n_heads
        self.q = nn.Linear(config.d_model, config.d_model)
        self.k = nn.Linear(config.d_model, config.d_model)
        self.v = nn.Linear(config.d_model, config.d_model)
        self.o = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        H = self.n_heads

        def heads(t):
            return t.reshape(B, T, H, D // H).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = allowed.expand(B, 1, T, T)
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, None, :]
            diagonal = torch.eye(T, dtype=torch.bool, device=x.device)
            allowed = allowed & (keys | diagonal)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        weights = self.dropout(torch.softmax(logits, dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(B, T, D)
        return self.o(out)


class Block(nn.Module):
    def __init__(self, config: TinyLMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, attention_mask):
        x = x + self.dropout(self.attn(self.ln1(x), attention_mask))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TinyLM(nn.Module):
    """Decoder-only LM: token + position embeddings, ``n_layers`` pre-LN blocks, ``lm_head``.

    Examples:
        >>> import torch
        >>> model = TinyLM(TinyLMConfig(vocab_size=10, d_model=8, n_heads=2, d_ff=16))
        >>> model(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 10])
    """

    def __init__(self, config: TinyLMConfig | None = None):
        super().__init__()
        self.config = config or TinyLMConfig()
        c = self.config
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-layer hidden states ``(B, T, d_model)`` (after the last LayerNorm)."""
        T = input_ids.shape[-1]
        if T > self.config.max_len:
            raise ValueError(
                f"Sequence length {T} exceeds max_len={self.config.max_len} of this TinyLM."
            )
        positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
        x = self.tok(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask))
