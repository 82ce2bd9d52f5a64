"""influence: training-data attribution with influence functions for any PyTorch model.

Score convention: ``score[i, j] = ∇m(z_test_i)ᵀ (C + λI)⁻¹ ∇ℓ(z_train_j)``; positive means
training example ``j`` helps query ``i`` (up-weighting it lowers the query's loss).
"""

from ._params_base import clone
from .curvature import CURVATURES, Curvature, Exact, Identity
from .estimator import InfluenceEstimator
from .exceptions import (
    BatchFormatError,
    ConvergenceWarning,
    CurvatureError,
    FallbackWarning,
    InfluenceError,
    ModelChangedError,
    NonFiniteGradientError,
    NotFittedError,
)
from .gradients import per_sample_grads
from .params import ParameterLayout, select_parameters
from .scoring import ScoringConfig
from .tasks import ClassificationTask, LanguageModelingTask, OutputTask, RegressionTask, Task

__version__ = "0.1.0"

__all__ = [
    # estimator
    "InfluenceEstimator",
    "ScoringConfig",
    "clone",
    # curvature
    "CURVATURES",
    "Curvature",
    "Exact",
    "Identity",
    # tasks
    "Task",
    "OutputTask",
    "ClassificationTask",
    "RegressionTask",
    "LanguageModelingTask",
    # parameters and gradients
    "ParameterLayout",
    "select_parameters",
    "per_sample_grads",
    # errors
    "InfluenceError",
    "NotFittedError",
    "BatchFormatError",
    "NonFiniteGradientError",
    "ModelChangedError",
    "CurvatureError",
    "ConvergenceWarning",
    "FallbackWarning",
]
