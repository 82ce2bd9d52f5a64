"""Iterating user loaders: any iterable of batches (a DataLoader, a list of batches, ...)."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Iterator

from torch.utils.data import DataLoader, RandomSampler

from .exceptions import InfluenceError


def iterate_batches(loader: Iterable[Any], name: str = "loader") -> Iterator[Any]:
    """Yields the loader's batches; raises if it yields none (an empty loader)."""
    if loader is None:
        raise InfluenceError(f"{name} is None: pass a DataLoader or an iterable of batches.")
    try:
        iterator = iter(loader)
    except TypeError:
        raise InfluenceError(
            f"{name} must be an iterable of batches (e.g. a torch DataLoader); got "
            f"{type(loader).__name__}."
        ) from None
    empty = True
    for batch in iterator:
        empty = False
        yield batch
    if empty:
        raise InfluenceError(
            f"{name} yielded no batches: it is empty. Check the dataset's length and that "
            "drop_last=True does not drop the only (partial) batch."
        )


def warn_if_shuffled(loader: Any, name: str) -> None:
    """Scores are indexed in loader order; a shuffling loader makes that order random."""
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
        warnings.warn(
            f"{name} shuffles (shuffle=True): score columns follow the loader's order, which "
            "changes on every pass, so they will not line up with dataset indices. Use "
            "shuffle=False for attribution.",
            UserWarning,
            stacklevel=3,
        )
