"""Curvature approximations, one file each, and the registry :data:`CURVATURES`.

Adding a curvature: write ``influence/curvature/<name>.py`` with a :class:`Curvature`
subclass and add it to ``CURVATURES``; the conformance tests then run on it.
"""

from ._base import Curvature
from ._operator import CurvatureOperator
from .arnoldi import Arnoldi
from .cg import CG, CGInfo, block_cg
from .datainf import DataInf
from .exact import Exact
from .identity import Identity
from .diagonal import Diagonal
from .kfac import EKFAC, KFAC
from .lissa import LiSSA

CURVATURES: tuple[type[Curvature], ...] = (Identity, Exact)
CURVATURES += (Diagonal, KFAC, EKFAC)
CURVATURES += (CG, LiSSA, Arnoldi, DataInf)

__all__ = [
    "CURVATURES",
    "Curvature",
    "Diagonal",
    "EKFAC",
    "Exact",
    "Identity",
    "KFAC",
    # matrix-free
    "CurvatureOperator",
    "CG",
    "CGInfo",
    "block_cg",
    "LiSSA",
    "Arnoldi",
    "DataInf",
]
