"""A small decoder-only transformer language model in pure torch."""

from .model import TinyLM, TinyLMConfig

__all__ = ["TinyLM", "TinyLMConfig"]
