"""influence: training-data attribution with influence functions for any PyTorch model.

Score convention: ``score[i, j] = ∇m(z_test_i)ᵀ (C + λI)⁻¹ ∇ℓ(z_train_j)``; positive means
training example ``j`` helps query ``i`` (up-weighting it lowers the query's loss).
"""

from . import evaluation
from ._params_base import clone
from .curvature import CURVATURES, EKFAC, KFAC, Curvature, Diagonal, Exact, Identity
from .curvature import CG, Arnoldi, CGInfo, CurvatureOperator, DataInf, LiSSA, block_cg
from .baselines import (
    BASELINES,
    TRAK,
    Baseline,
    GradientSimilarity,
    RepresentationSimilarity,
    TracIn,
)
from .estimator import InfluenceEstimator
from .evaluation import DiagnosticReport, ScoreDiagnostics, diagnose, diagnose_scores, load_scores
from .exceptions import (
    BatchFormatError,
    ConvergenceWarning,
    CurvatureError,
    DistributedTimeoutError,
    FallbackWarning,
    InfluenceError,
    ModelChangedError,
    NonFiniteGradientError,
    NotFittedError,
    StochasticModelError,
    RunLockedError,
)
from .gradients import per_sample_grads
from .io import CorruptedFileError, FormatVersionError, ModelMismatchError, StorageError, register_class
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
    "Diagonal",
    "KFAC",
    "EKFAC",
    # matrix-free curvature
    "CurvatureOperator",
    "CG",
    "CGInfo",
    "block_cg",
    "LiSSA",
    "Arnoldi",
    "DataInf",
    # baselines
    "BASELINES",
    "Baseline",
    "RepresentationSimilarity",
    "GradientSimilarity",
    "TracIn",
    "TRAK",
    # evaluation
    "evaluation",
    "diagnose",
    "DiagnosticReport",
    "diagnose_scores",
    "ScoreDiagnostics",
    "load_scores",
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
    "StochasticModelError",
    "BatchFormatError",
    "NonFiniteGradientError",
    "ModelChangedError",
    "CurvatureError",
    "RunLockedError",
    "DistributedTimeoutError",
    "ConvergenceWarning",
    "FallbackWarning",
    # storage (influence.io): classes a saved file may name, errors; data-parallel helpers
    # live in influence.distributed
    "register_class",
    "StorageError",
    "CorruptedFileError",
    "FormatVersionError",
    "ModelMismatchError",
]
