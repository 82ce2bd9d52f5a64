"""Progress bars, the ``influence`` logger, per-stage timings and run options.

Long loops (curvature fitting, scoring) wrap their iterables in :func:`track`, which shows a
tqdm bar when progress is enabled. Progress is decided per run:

- ``progress=True``: always show bars (on stderr);
- ``progress=False``: never;
- ``progress=None`` (default): show them only when stderr is a terminal, so logs of batch
  jobs and CI stay clean.

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
