"""Progress bars, the ``influence`` logger, per-stage timings and run options.

Long loops (curvature fitting, scoring) wrap their iterables in :func:`track`, which shows a
tqdm bar when progress is enabled. Progress is decided per run:

- ``progress=True``: always show bars (on stderr);
- ``progress=False``: never;
- ``progress=None`` (default): show them only when stderr is a terminal, so logs of batch
  jobs and CI stay clean.

Iterative solvers (CG, LiSSA, Lanczos, power iteration) open a :func:`solver_progress` bar per
solve, with iterations as the unit and the current residual as the bar's postfix; it is
``None`` when progress is off, so the solver computes nothing extra for it.

The estimator sets the options of a run with :func:`run_options`; a curvature fitted on its
own uses the defaults. Messages go to ``logging.getLogger("influence")`` (configure it with the
standard :mod:`logging` tools, e.g. ``logging.basicConfig(level=logging.INFO)``), and
:func:`timed` adds each stage's wall time to the run's ``timings`` dict (the estimator exposes
it as ``timings_``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

logger = logging.getLogger("influence")


@dataclass
class RunOptions:
    """Options of one fit or scoring run (see the module docstring)."""

    progress: bool | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    timings: dict[str, float] = field(default_factory=dict)
    self_check: bool = True


_OPTIONS: contextvars.ContextVar[RunOptions] = contextvars.ContextVar("influence_run_options")


def current() -> RunOptions:
    """The options of the enclosing run (defaults outside any)."""
    try:
        return _OPTIONS.get()
    except LookupError:
        return RunOptions()


@contextlib.contextmanager
def run_options(**kwargs: Any) -> Iterator[RunOptions]:
    """Sets the run options for the enclosed code (nested runs inherit unset fields)."""
    base = current()
    merged = RunOptions(
        progress=kwargs.get("progress", base.progress),
        checkpoint_dir=kwargs.get("checkpoint_dir", base.checkpoint_dir),
        checkpoint_every=kwargs.get("checkpoint_every", base.checkpoint_every),
        timings=kwargs.get("timings", base.timings),
        self_check=kwargs.get("self_check", base.self_check),
    )
    if not isinstance(merged.checkpoint_every, int) or merged.checkpoint_every < 1:
        raise ValueError(
            f"checkpoint_every must be a positive integer (batches); got {merged.checkpoint_every!r}."
        )
    token = _OPTIONS.set(merged)
    try:
        yield merged
    finally:
        _OPTIONS.reset(token)


def progress_enabled(progress: bool | None = None) -> bool:
    """Resolves ``None`` to "stderr is a terminal"."""
    progress = current().progress if progress is None else progress
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def track(iterable: Iterable[Any], desc: str, total: Any = None, unit: str = "batch") -> Iterable[Any]:
    """Wraps ``iterable`` in a tqdm bar when progress is enabled; otherwise returns it as is.

    ``total`` is the number of items, or an object whose ``len()`` is (e.g. the loader that
    ``iterable`` wraps); default ``len(iterable)`` where defined.
    """
    if not progress_enabled():
        return iterable
    from tqdm.auto import tqdm

    source = iterable if total is None else total
    if not isinstance(source, int):
        try:
            source = len(source)  # type: ignore[arg-type]
        except TypeError:
            source = None
    total = source
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr)


class SolverBar:
    """A tqdm bar over a solver's iterations that shows its current convergence measures.

    Made by :func:`solver_progress`, which closes it. Measures are shown as ``name=value``
    with three significant digits.
    """

    def __init__(self, desc: str, total: int | None, unit: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    @property
    def n(self) -> int:
        """Iterations counted so far."""
        return int(self._bar.n)

    def update(self, n: int = 1, **measures: float) -> None:
        """Counts ``n`` more iterations and, if given, replaces the shown measures (the bar is
        redrawn at tqdm's usual rate, not at every call)."""
        if measures:
            self._bar.set_postfix(_formatted(measures), refresh=False)
        self._bar.update(n)

    def finish(self, **measures: float) -> None:
        """Shows the solver's final measures (always drawn, whatever the redraw rate)."""
        self._bar.set_postfix(_formatted(measures), refresh=True)

    def close(self) -> None:
        self._bar.close()


def _formatted(measures: dict[str, float]) -> dict[str, str]:
    return {name: f"{float(value):.3g}" for name, value in measures.items()}


@contextlib.contextmanager
def solver_progress(desc: str, total: int | None, unit: str = "it") -> Iterator[SolverBar | None]:
    """A :class:`SolverBar` while the block runs when progress is enabled, else ``None``.

    Solvers compute the measures they show only when the bar is not ``None``, so a solve
    without progress costs nothing extra.
    """
    if not progress_enabled():
        yield None
        return
    bar = SolverBar(desc, total, unit)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    """Adds the wall time of the enclosed code to ``current().timings[stage]`` and logs it."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        timings = current().timings
        timings[stage] = timings.get(stage, 0.0) + elapsed
        logger.info("%s took %.3f s", stage, elapsed)
