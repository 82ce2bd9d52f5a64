"""Curvature approximations, one file each, and the registry :data:`CURVATURES`.

Adding a curvature: write ``influence/curvature/<name>.py`` with a :class:`Curvature`
subclass and add it to ``CURVATURES``; the conformance tests then run on it.
"""

from ._base import Curvature
from .exact import Exact
from .identity import Identity

CURVATURES: tuple[type[Curvature], ...] = (Identity, Exact)

__all__ = ["CURVATURES", "Curvature", "Exact", "Identity"]
