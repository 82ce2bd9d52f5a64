"""Iterating user loaders: any iterable of batches (a DataLoader, a list of batches, ...)."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Iterator

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from .exceptions import InfluenceError


def _is_dataset(loader: Any) -> bool:
    """A dataset of single examples (torch map-style or HuggingFace ``datasets``), not batches."""
    if isinstance(loader, DataLoader) or isinstance(loader, IterableDataset):
        return False  # an IterableDataset may yield ready batches: it is left to the user
    if isinstance(loader, Dataset):
        return True
    return type(loader).__module__.split(".")[0] == "datasets" and hasattr(loader, "__getitem__")


def iterate_batches(loader: Iterable[Any], name: str = "loader") -> Iterator[Any]:
    """Yields the loader's batches; raises if it yields none (an empty loader).

    Raises:
        InfluenceError: ``loader`` is None, not iterable, empty, or a dataset of single
            examples (a ``TensorDataset``, a HuggingFace ``Dataset``, ...) instead of batches.
    """
    if loader is None:
        raise InfluenceError(f"{name} is None: pass a DataLoader or an iterable of batches.")
    if _is_dataset(loader):
        raise InfluenceError(
            f"{name} is a Dataset ({type(loader).__name__}), not a DataLoader: iterating it "
            "yields single examples without a batch dimension. Wrap it: "
            "DataLoader(dataset, batch_size=..., shuffle=False)."
        )
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


def _order(loader: DataLoader) -> str | None:
    """What makes a DataLoader's order differ from the dataset's indices, or None."""
    if isinstance(loader.dataset, IterableDataset):
        return None  # the dataset's own order; there is no sampler
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and not isinstance(batch_sampler, BatchSampler):
        return f"a custom batch_sampler ({type(batch_sampler).__name__})"
    sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
    if isinstance(sampler, SequentialSampler):
        return None
    if isinstance(sampler, RandomSampler):
        return "shuffles (shuffle=True, a RandomSampler)"
    return f"draws examples with a {type(sampler).__name__}, not a SequentialSampler"


def _dropped(loader: DataLoader) -> tuple[int, int] | None:
    """``(dropped, total)`` examples that ``drop_last=True`` leaves out, when some are."""
    batch_sampler = loader.batch_sampler
    if not isinstance(batch_sampler, BatchSampler) or not batch_sampler.drop_last:
        return None
    try:
        total = len(batch_sampler.sampler)
    except TypeError:  # an unsized sampler: the count is unknown
        return None
    dropped = total % batch_sampler.batch_size
    return (dropped, total) if dropped else None


def warn_if_shuffled(loader: Any, name: str) -> None:
    """Warns when score columns will not line up with dataset indices.

    Scores are indexed in loader order: any DataLoader whose order is not the dataset's index
    order (a random, weighted, subset or distributed sampler, a custom batch sampler) or that
    drops the last partial batch (``drop_last=True``: those examples get no column and do not
    enter the curvature) gets a ``UserWarning`` saying so and how to fix it.
    """
    if not isinstance(loader, DataLoader):
        return
    order = _order(loader)
    if order is not None:
        warnings.warn(
            f"{name} {order}: score columns follow the loader's order, which is not the "
            "dataset's index order (and, for a random sampler, changes on every pass), so they "
            "will not line up with dataset indices. Use DataLoader(dataset, batch_size=..., "
            "shuffle=False) for attribution.",
            UserWarning,
            stacklevel=3,
        )
    dropped = _dropped(loader)
    if dropped is not None:
        count, total = dropped
        warnings.warn(
            f"{name} has drop_last=True: the last {count} of its {total} examples "
            f"({total} % batch_size {loader.batch_sampler.batch_size}) are never seen, so they "
            "get no score column and do not enter the curvature. Use drop_last=False to "
            "attribute every example.",
            UserWarning,
            stacklevel=3,
        )
