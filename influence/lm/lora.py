"""LoRA (low-rank adaptation) for any ``nn.Linear``, selected by name pattern.

``apply_lora(model, targets=["*.q", "*.v"], r=4, alpha=32, dropout=0.1)`` replaces every
matching ``nn.Linear`` by a :class:`LoRALinear` computing

    y = base(x) + (alpha / r) · lora_B(lora_A(dropout(x)))

with ``lora_A`` (``r × d_in``, Kaiming-uniform) and ``lora_B`` (``d_out × r``, zeros) plain
``nn.Linear`` submodules, so that per-layer hooks and Kronecker curvatures (K-FAC, EK-FAC)
see them as ordinary layers. Because ``lora_B`` starts at zero, the wrapped model equals the
base model at initialisation. Every other parameter is frozen, so ``params="trainable"`` and
``params="*lora_*"`` both select the adapters only.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import torch
from torch import nn

LORA_PARAMS = "*lora_*"
"""Glob pattern selecting the adapters' parameters (ours and peft's)."""


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a trainable low-rank update; the base layer is frozen.

    Args:
        base: the layer to adapt (kept as ``self.base``).
        r: rank of the update.
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input (training mode only).

    Examples:
        >>> import torch
        >>> layer = LoRALinear(torch.nn.Linear(6, 3), r=2, alpha=4)
        >>> x = torch.randn(5, 6)
        >>> torch.equal(layer(x), layer.base(x))  # lora_B starts at zero
        True
    """

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 32.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear; got {type(base).__name__}.")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer; got {r!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1); got {dropout!r}.")
        self.base = base
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kwargs)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kwargs)
        self.lora_dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / r) · B A`` as a ``(d_out, d_in)`` matrix."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merge(self) -> None:
        """Adds the update into ``base.weight``; the adapter path is then skipped."""
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta_weight()
            self.merged = True

    def unmerge(self) -> None:
        """Undoes :meth:`merge`."""
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_lora(
    model: nn.Module,
    targets: str | Sequence[str] = ("*.q", "*.v"),
    r: int = 4,
    alpha: float = 32.0,
    dropout: float = 0.1,
) -> nn.Module:
    """Wraps every ``nn.Linear`` whose module name matches ``targets`` in :class:`LoRALinear`.

    The model is modified in place and returned; every parameter outside the adapters gets
    ``requires_grad=False``. The defaults are the study's setting (query and value projections
    of every attention layer of :class:`~influence.lm.TinyLM`, r = 4, alpha = 32, dropout 0.1).

    Args:
        model: any module containing ``nn.Linear`` layers.
        targets: glob pattern(s) matched against module names (``"blocks.0.attn.q"``).
        r: rank; ``alpha``: scaling numerator; ``dropout``: adapter input dropout.

    Raises:
        ValueError: when no ``nn.Linear`` matches (the message lists the Linear layers).

    Examples:
        >>> from influence.lm import TinyLM, TinyLMConfig
        >>> model = apply_lora(TinyLM(TinyLMConfig(n_layers=2)), r=2)
        >>> sorted({n.rsplit(".", 2)[0] for n, p in model.named_parameters() if p.requires_grad})
        ['blocks.0.attn.q', 'blocks.0.attn.v', 'blocks.1.attn.q', 'blocks.1.attn.v']
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.rsplit(".", 1)[-1].startswith("lora_")
    ]
    chosen = [(name, m) for name, m in linears if _matches(name, patterns)]
    if not chosen:
        available = ", ".join(name for name, _ in linears) or "(none)"
        raise ValueError(
            f"LoRA target pattern(s) {patterns} matched no nn.Linear of {type(model).__name__}. "
            f"Patterns are globs matched against module names. nn.Linear modules: {available}."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, r=r, alpha=alpha, dropout=dropout))
    return model


def lora_target_names(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules matching the glob pattern(s) ``targets``."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in name and _matches(name, patterns)
    ]


def apply_peft_lora(
    model: nn.Module,
    targets: str | Sequence[str] = ("*.q", "*.v"),
    r: int = 4,
    alpha: float = 32.0,
    dropout: float = 0.1,
) -> nn.Module:
    """The same adapters through ``peft`` (optional dependency): returns a ``PeftModel``.

    peft names the adapter weights ``...q.lora_A.default.weight``, so ``params="*lora_*"``
    selects them as it selects ours.

    Raises:
        ImportError: when peft is not installed (``pip install "influence-estimation[hf]"``).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError(
            "apply_peft_lora needs the optional dependency peft, which is not installed. "
            "Install it with pip install 'influence-estimation[hf]', or use apply_lora (no "
            "dependency), which builds the same adapters."
        ) from error
    names = lora_target_names(model, targets)
    if not names:
        apply_lora(model, targets)  # raises the error listing the Linear layers
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    return get_peft_model(model, config)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's :class:`LoRALinear` modules by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Merges every adapter into its base weight (in place); returns the model."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge_lora` (in place); returns the model."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights only (names containing ``lora_``), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
