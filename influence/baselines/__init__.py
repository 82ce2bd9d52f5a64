"""Baselines with the estimator interface: RepSim, gradient similarity, TracIn, TRAK.

All follow :class:`InfluenceEstimator`'s interface (``fit(model, train_loader)``,
``pairwise_scores``, ``self_scores``, ``top_k``) and sign convention: larger = more
responsible. :data:`BASELINES` lists them for benchmarks and conformance tests.
"""

from ._base import Baseline
from .gradient_similarity import GradientSimilarity
from .representation import RepresentationSimilarity
from .tracin import TracIn
from .trak import TRAK, RandomProjection

BASELINES: tuple[type[Baseline], ...] = (
    RepresentationSimilarity,
    GradientSimilarity,
    TracIn,
    TRAK,
)
"""Every baseline class (RepSim, gradient similarity, TracIn, TRAK), for benchmarks and the
conformance tests.

Examples:
    >>> import influence
    >>> [cls.__name__ for cls in influence.BASELINES]
    ['RepresentationSimilarity', 'GradientSimilarity', 'TracIn', 'TRAK']
"""

__all__ = [
    "BASELINES",
    "Baseline",
    "GradientSimilarity",
    "RandomProjection",
    "RepresentationSimilarity",
    "TRAK",
    "TracIn",
]
