"""A callable that crafted files in tests/test_io_security.py name: loading must never call it.

This module is importable from the tests (conftest.py puts tests/ on ``sys.path``), so code
that imports and calls names read from a file WOULD import it and call :func:`bait`, which
records every call in :data:`CALLS`. The tests assert that it was neither imported nor called.
"""

from __future__ import annotations

CALLS: list[tuple[tuple, dict]] = []


def bait(*args, **kwargs):
    """Records the call; returns an object that passes for a task or curvature argument."""
    CALLS.append((args, kwargs))
    return None
