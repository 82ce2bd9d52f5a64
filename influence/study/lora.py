"""The study's LoRA adapters through peft: which modules, which layers, fresh or loaded.

The study adapts the attention query and value projections of every layer (r = 4,
alpha = 32, dropout 0.1). Architectures name them differently, so the targets are found by
module name: the first group of :data:`TARGET_GROUPS` whose names occur in the model
(``q_proj``/``v_proj`` in Llama, Mistral, Qwen, OPT; ``c_attn``, the fused query-key-value
projection, in GPT-2; ``query_key_value`` in GPT-NeoX, Falcon, BLOOM; ``q``/``v`` in the
built-in TinyLM; ...). A target name matches a module whose last name component equals it,
or whose full name matches it as a glob (``"model.layers.*.self_attn.q_proj"``). The layer of
a module is the first integer component of its name (``model.layers.7.self_attn.q_proj`` is
in layer 7).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .data import STUDY_EXTRA

TARGET_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("c_attn",),
    ("query_key_value",),
    ("qkv_proj",),
    ("Wqkv",),
    ("query", "value"),
    ("q", "v"),
)
"""Query/value projections of common architectures, tried in order."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapters' hyperparameters (defaults: the study's)."""

    r: int = 4
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            f"LoRA fine-tuning in influence study uses the optional dependency peft, which is "
            f"not installed. Install it with {STUDY_EXTRA}."
        ) from error
    return peft


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # HF GPT-2


def _matches(name: str, target: str) -> bool:
    return name.rsplit(".", 1)[-1] == target or fnmatch.fnmatchcase(name, target)


def layer_index(name: str) -> int | None:
    """The first integer component of a module name (its layer), or ``None``.

    Examples:
        >>> layer_index("model.layers.7.self_attn.q_proj"), layer_index("lm_head")
        (7, None)
    """
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def find_targets(model: nn.Module, targets: Sequence[str] | None = None,
                 layers: Sequence[int] | None = None) -> list[str]:
    """Full names of the modules to adapt (see the module docstring).

    Raises:
        ValueError: no module matches, or a requested layer does not exist.
    """
    candidates = [n for n, m in model.named_modules() if n and _adaptable(m) and "lora_" not in n]
    if targets:
        chosen = [n for n in candidates if any(_matches(n, t) for t in targets)]
        if not chosen:
            raise ValueError(
                f"--lora-targets {list(targets)} matched no Linear/Conv1D module of "
                f"{type(model).__name__}. Targets are last name components or globs of full "
                f"names; the adaptable modules include {candidates[:12]}."
            )
    else:
        chosen = []
        for group in TARGET_GROUPS:
            chosen = [n for n in candidates if any(_matches(n, t) for t in group)]
            if chosen:
                break
        if not chosen:
            raise ValueError(
                f"Found no attention query/value projection in {type(model).__name__} (looked "
                f"for {[g for group in TARGET_GROUPS for g in group]}). Name the modules to "
                f"adapt with --lora-targets; the adaptable modules include {candidates[:12]}."
            )
    if layers:
        present = sorted({i for i in map(layer_index, chosen) if i is not None})
        missing = sorted(set(layers) - set(present))
        if missing:
            raise ValueError(
                f"--lora-layers {sorted(layers)}: layer(s) {missing} do not exist; the target "
                f"modules are in layers {present}."
            )
        chosen = [n for n in chosen if layer_index(n) in set(layers)]
    return chosen


def add_lora(model: nn.Module, settings: LoraSettings, seed: int = 0) -> nn.Module:
    """A peft ``PeftModel`` with fresh adapters (``lora_B = 0``: it equals ``model``)."""
    peft = _peft()
    names = find_targets(model, settings.targets, settings.layers)
    conv1d = any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names)
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha,
                             lora_dropout=settings.dropout, target_modules=names,
                             fan_in_fan_out=conv1d)
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


def fresh_from_adapter(model: nn.Module, path: str, seed: int = 0) -> nn.Module:
    """``model`` with fresh adapters in the configuration saved at ``path`` (not its weights)."""
    peft = _peft()
    config = peft.PeftConfig.from_pretrained(path)
    if config.peft_type != peft.PeftType.LORA:
        raise ValueError(f"The adapter at {path!r} is a {config.peft_type} adapter; influence "
                         "study attributes LoRA adapters.")
    config.inference_mode = False
    torch.manual_seed(seed)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(
            f"The adapter at {path!r} does not fit {type(model).__name__}: {error} Pass the base "
            "model it was trained on as --model."
        ) from error


def load_adapter_weights(peft_model: nn.Module, path: str) -> nn.Module:
    """Loads the adapter weights saved at ``path`` into ``peft_model`` (in place)."""
    _peft()
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    weights = load_peft_weights(path, device=str(next(peft_model.parameters()).device))
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(
            f"The adapter at {path!r} lacks weights for {missing[:5]} ({len(missing)} in all): "
            "it was trained on another model or configuration. Pass the base model it was "
            "trained from as --model."
        )
    return peft_model
