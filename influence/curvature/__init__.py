"""Curvature approximations, one file each, and the registry :data:`CURVATURES`.

Adding a curvature: write ``influence/curvature/<name>.py`` with a :class:`Curvature`
subclass and add it to ``CURVATURES``; the conformance tests then run on it.
"""

from ._base import Curvature
from .exact import Exact
from .identity import Identity
from .diagonal import Diagonal
from .kfac import EKFAC, KFAC

CURVATURES: tuple[type[Curvature], ...] = (Identity, Exact)
CURVATURES += (Diagonal, KFAC, EKFAC)

__all__ = ["CURVATURES", "Curvature", "Diagonal", "EKFAC", "Exact", "Identity", "KFAC"]
