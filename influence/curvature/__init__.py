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

CURVATURES: tuple[type[Curvature], ...] = (
    Identity, Exact,
    Diagonal, KFAC, EKFAC,
    CG, LiSSA, Arnoldi, DataInf,
)
"""Every curvature class, in the order of the docs; the generic conformance tests
(``tests/test_curvature_conformance.py``) run on each entry.

Examples:
    >>> import influence
    >>> [cls.__name__ for cls in influence.CURVATURES]
    ['Identity', 'Exact', 'Diagonal', 'KFAC', 'EKFAC', 'CG', 'LiSSA', 'Arnoldi', 'DataInf']
    >>> all(issubclass(cls, influence.Curvature) for cls in influence.CURVATURES)
    True
"""

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
