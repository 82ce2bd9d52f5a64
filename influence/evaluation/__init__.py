"""Evaluation of attribution methods: counterfactual benchmarks, detection and class
metrics, iHVP error, the :func:`diagnose` trust report and :func:`diagnose_scores` for a
score matrix alone.

Examples:
    Scores of 2 queries against 4 training examples, the training examples' classes and the
    queries' classes; which training examples were planted (e.g. mislabeled):

    >>> from influence import evaluation
    >>> scores = [[0.9, 0.1, 0.8, 0.3], [0.2, 0.7, 0.1, 0.6]]
    >>> evaluation.top1_accuracy(scores, ["a", "b", "a", "b"], ["a", "b"])
    1.0
    >>> evaluation.roc_auc([0.9, 0.1, 0.8, 0.3], [True, False, False, False])
    1.0
"""

from .class_metrics import cover, top1_accuracy
from .detection import precision_at_k, recall_at_k, roc_auc
from .diagnose import THRESHOLDS, diagnose
from .report import DiagnosticReport
from .score_diagnostics import SCORE_THRESHOLDS, ScoreDiagnostics, diagnose_scores
from .score_files import load_scores
from .ihvp import IHVPError, ihvp_error
from .lds import (
    CorrelationResult,
    LDSResult,
    SubsetRetraining,
    leave_one_out_correlation,
    linear_datamodeling_score,
    random_subset_masks,
    retrain_on_subsets,
)

__all__ = [
    # counterfactual benchmarks
    "linear_datamodeling_score",
    "retrain_on_subsets",
    "random_subset_masks",
    "leave_one_out_correlation",
    "LDSResult",
    "SubsetRetraining",
    "CorrelationResult",
    # the study's class metrics
    "top1_accuracy",
    "cover",
    # planted-set detection
    "roc_auc",
    "precision_at_k",
    "recall_at_k",
    # iHVP error and the trust report
    "ihvp_error",
    "IHVPError",
    "diagnose",
    "DiagnosticReport",
    "THRESHOLDS",
    # a score matrix alone: diagnostics and loading
    "diagnose_scores",
    "ScoreDiagnostics",
    "SCORE_THRESHOLDS",
    "load_scores",
]
