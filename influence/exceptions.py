"""Exceptions and warnings raised by the library.

Every error names what went wrong, what was expected and how to fix it.
"""

from __future__ import annotations


class InfluenceError(Exception):
    """Base class of the library's errors."""


class NotFittedError(InfluenceError, AttributeError):
    """A method that needs fitted state was called before ``fit``."""


class BatchFormatError(InfluenceError, TypeError):
    """A task could not read a batch yielded by a loader."""


class NonFiniteGradientError(InfluenceError, FloatingPointError):
    """Per-example gradients contained NaN or inf values."""


class ModelChangedError(InfluenceError, RuntimeError):
    """The model's attributed parameters changed after ``fit``."""


class StochasticModelError(InfluenceError, RuntimeError):
    """The model gives different losses on two identical calls (dropout or sampling active)."""


class CurvatureError(InfluenceError, RuntimeError):
    """A curvature could not be fitted or applied (too large, not positive definite, ...)."""


class RunLockedError(InfluenceError, RuntimeError):
    """Another process is writing the same score file or checkpoint directory."""


class DistributedTimeoutError(InfluenceError, TimeoutError):
    """Under ``torch.distributed``, a rank did not reach a collective within ``distributed_timeout``."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


class FallbackWarning(UserWarning):
    """A slower or coarser code path was taken; the warning says which and why."""
