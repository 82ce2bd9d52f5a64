"""Per-example gradients: the torch.func path for any module, and the hook path."""

from .functional import per_sample_grads
from .hooks import BatchGrads, GradientComputer, fast_per_sample_grads

__all__ = ["per_sample_grads", "GradientComputer", "BatchGrads", "fast_per_sample_grads"]
