"""A small decoder-only transformer language model in pure torch, and LoRA for any Linear."""

from .lora import (
    LORA_PARAMS,
    LoRALinear,
    apply_lora,
    apply_peft_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from .model import TinyLM, TinyLMConfig

__all__ = [
    "TinyLM",
    "TinyLMConfig",
    "LORA_PARAMS",
    "LoRALinear",
    "apply_lora",
    "apply_peft_lora",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
]
