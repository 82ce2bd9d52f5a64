"""Per-example gradients: the torch.func path for any module."""

from .functional import per_sample_grads

__all__ = ["per_sample_grads"]
