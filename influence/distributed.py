"""Data-parallel fitting and scoring with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Launch one process per device with ``torchrun`` and initialise the default process group
before fitting (see ``examples/distributed.py``)::

    torchrun --nproc_per_node=2 examples/distributed.py

When a process group with more than one rank is initialised, :class:`InfluenceEstimator`
works data-parallel automatically:

- **fit**: every rank accumulates the curvature statistics of its own **contiguous** shard of
  the training loader (:func:`shard`), the sums and counts are all-reduced, and every rank
  finalises the same fitted curvature. Curvatures opt in through the statistics protocol of
  :class:`~influence.curvature.Curvature` (``_batch_statistics`` / ``_finalize``); a curvature
  that does not implement it is fitted on the full loader on every rank (correct, not faster).
- **scoring** (``pairwise_scores``, ``self_scores``, ``top_k``): each rank scores its shard of
  the training set; the pieces are gathered so that every rank returns the full result, in the
  global training order. With ``out=path`` each rank writes its own columns into one shared
  memory-mapped file instead (the ranks must share a file system).

Shards are contiguous and in rank order, so the global index of a training example is its
rank's offset plus its index in the shard. Uneven splits are fine: rank ``r`` of ``W`` gets
items ``[⌊r·n/W⌋, ⌊(r+1)·n/W⌋)``. A DataLoader over a sized dataset is split by examples (a
new DataLoader over a ``Subset`` with the same batch size and collate function); any other
sized iterable of batches (e.g. a list) is split by batches (a non-list is iterated in full on
every rank, skipping the other ranks' batches, so its data is read ``W`` times).

Every rank must hold the same model weights (checked through the parameter fingerprint) and
iterate the same loaders (checked at the start of each stage through cheap fingerprints, see
:func:`influence._fingerprint.check_same_inputs`); the query loader is not split.

**Timeouts.** Every collective of the library is preceded by a monitored barrier
(``torch.distributed.monitored_barrier``, on a gloo group) with the estimator's
``distributed_timeout`` (default :data:`DEFAULT_TIMEOUT`, 5 minutes): when a rank does not
arrive in time (a loader that hangs, a crashed process), the others raise
:class:`DistributedTimeoutError` naming the stage (``"fit"``, ``"pairwise_scores"``, ...), the
collective and, on rank 0, the ranks that did not arrive, instead of waiting for the process
group's own timeout (30 minutes for gloo). Raise the timeout when ranks may legitimately arrive
minutes apart (very uneven shards or devices); ``None`` relies on the process group's timeout.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from datetime import timedelta
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.sampler import RandomSampler, SequentialSampler

from .exceptions import DistributedTimeoutError, InfluenceError

#: seconds a rank waits at a collective for the others (``InfluenceEstimator(distributed_timeout=...)``)
DEFAULT_TIMEOUT = 300.0
_STAGE: contextvars.ContextVar[tuple[str, float | None]] = contextvars.ContextVar(
    "influence_stage", default=("influence", DEFAULT_TIMEOUT)
)
_MONITOR_GROUPS: dict[Any, Any] = {}


def is_active() -> bool:
    """True when a default process group with more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group; ``(0, 1)`` without one."""
    if not is_active():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous range ``[start, stop)`` of ``n`` items that rank ``rank`` owns."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got rank={rank}, world_size={world_size}.")
    return n * rank // world_size, n * (rank + 1) // world_size


class _BatchShard:
    """The batches ``[start, stop)`` of a sized iterable of batches, re-iterable."""

    def __init__(self, loader: Iterable[Any], start: int, stop: int):
        self.loader, self.start, self.stop = loader, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.loader, Sequence):
            yield from (self.loader[i] for i in range(self.start, self.stop))
            return
        for i, batch in enumerate(self.loader):
            if i >= self.stop:
                break
            if i >= self.start:
                yield batch


def shard(loader: Iterable[Any], rank: int | None = None, world_size: int | None = None) -> Iterable[Any]:
    """The contiguous part of ``loader`` that ``rank`` processes (defaults: this process).

    Args:
        loader: a DataLoader (split by examples when its dataset is sized and it batches with
            a plain ``batch_size``), or any sized iterable of batches (split by batches).
        rank, world_size: default to the current process group (``0, 1`` without one).

    Returns:
        ``loader`` itself for one rank; otherwise a re-iterable shard.

    Examples:
        >>> shard(list(range(5)), rank=1, world_size=2)  # batches 2, 3, 4
        [2, 3, 4]
        >>> shard_bounds(10, 0, 3), shard_bounds(10, 2, 3)
        ((0, 3), (6, 10))
    """
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    if world_size == 1:
        return loader
    if isinstance(loader, DataLoader) and _splittable_by_examples(loader):
        start, stop = shard_bounds(len(loader.dataset), rank, world_size)
        if stop == start:
            raise InfluenceError(
                f"Rank {rank} of {world_size} gets no training examples ({len(loader.dataset)} in "
                "all): use fewer processes than examples."
            )
        return DataLoader(
            Subset(loader.dataset, range(start, stop)),
            batch_size=loader.batch_size,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
        )
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise InfluenceError(
            f"Cannot split a {type(loader).__name__} across {world_size} ranks: it has no "
            "len(). Pass a DataLoader over a sized dataset or a list of batches."
        ) from None
    start, stop = shard_bounds(n, rank, world_size)
    if stop == start:
        raise InfluenceError(
            f"Rank {rank} of {world_size} gets no batches ({n} in all): use fewer processes "
            "than batches, or smaller batches."
        )
    if isinstance(loader, list):
        return loader[start:stop]
    return _BatchShard(loader, start, stop)


def _splittable_by_examples(loader: DataLoader) -> bool:
    try:
        len(loader.dataset)
    except TypeError:
        return False
    # a shuffling loader is split in dataset order: curvature sums do not depend on order,
    # and scores are indexed in loader order anyway (a warning says so)
    return loader.batch_size is not None and isinstance(loader.sampler, (SequentialSampler, RandomSampler))


# --------------------------------------------------------------------------------- timeouts
def check_timeout(timeout: Any) -> float | None:
    """Validates ``distributed_timeout`` (seconds, or ``None``)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(
            f"distributed_timeout must be a positive number of seconds or None (the process "
            f"group's own timeout); got {timeout!r}."
        )
    return float(timeout)


@contextlib.contextmanager
def stage(name: str, timeout: float | None = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Names the enclosed stage and sets its timeout for the collectives inside (nested stages
    are named ``outer > inner``)."""
    outer = _STAGE.get()
    full = name if outer[0] == "influence" else f"{outer[0]} > {name}"
    token = _STAGE.set((full, check_timeout(timeout)))
    try:
        yield
    finally:
        _STAGE.reset(token)


def _monitor_group():
    """A gloo group for monitored barriers: the default group when it is gloo, else one created
    once (by every rank, at the same first collective)."""
    import torch.distributed as dist

    default = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return default
    if default not in _MONITOR_GROUPS:
        _MONITOR_GROUPS[default] = dist.new_group(backend="gloo", timeout=timedelta(seconds=_STAGE.get()[1] or 1800))
    return _MONITOR_GROUPS[default]


def _arrive(collective: str) -> None:
    """Waits for every rank at ``collective`` for at most the stage's timeout (see the module
    docstring)."""
    name, timeout = _STAGE.get()
    if timeout is None:
        return
    import torch.distributed as dist

    try:
        dist.monitored_barrier(_monitor_group(), timeout=timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as error:
        rank = dist.get_rank()
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(error))
        if found:
            who = f"rank(s) {found.group(1).strip()} did not arrive"
        elif rank == 0:
            who = "some rank did not arrive"
        else:
            who = f"rank {rank} arrived but rank 0 did not confirm that all ranks did (rank 0's error names the missing ones, unless rank 0 is the one missing)"
        raise DistributedTimeoutError(
            f"{name}: {who} at the {collective} within distributed_timeout={timeout:g} s. A rank "
            "whose loader hangs or that crashed stops the others; if the ranks merely run at "
            "different speeds, pass a larger InfluenceEstimator(distributed_timeout=...)."
        ) from error


# --------------------------------------------------------------------------------- collectives
def all_reduce_statistics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums each statistic over the ranks (in place); every rank gets the totals.

    This is the only collective a curvature's fit needs: statistics are **sums** over
    examples (and counts), so the global value is the sum of the ranks' values.
    """
    if not is_active():
        return stats
    import torch.distributed as dist

    _arrive("all-reduce of the statistics")
    for key in sorted(stats):
        dist.all_reduce(stats[key], op=dist.ReduceOp.SUM)
    return stats


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums one tensor over the ranks in place (e.g. a shard's Hessian-vector product)."""
    return all_reduce_statistics({"t": tensor})["t"]


def all_gather_counts(count: int, device: torch.device | str = "cpu") -> list[int]:
    """Each rank's ``count`` (e.g. examples in its shard), in rank order."""
    if not is_active():
        return [count]
    import torch.distributed as dist

    _arrive("all-gather of the counts")
    world = dist.get_world_size()
    local = torch.tensor([count], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return [int(p) for p in parts]


def all_gather_cat(local: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenates every rank's ``local`` along ``dim`` in rank order (sizes may differ)."""
    if not is_active():
        return local
    import torch.distributed as dist

    local = local.movedim(dim, 0).contiguous()
    sizes = all_gather_counts(local.shape[0], local.device)
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    _arrive("all-gather of the results")
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).movedim(0, dim)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not is_active():
        return [obj]
    import torch.distributed as dist

    _arrive("all-gather of the checks")
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_top_k(
    values: torch.Tensor, indices: torch.Tensor, n_local: int, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges the ranks' running top-k (shard-local indices) into the global top-k.

    Rank ``r``'s indices are shifted by the examples of the ranks before it (shards are
    contiguous), then the candidates of all ranks are gathered and reduced to ``k``.
    """
    if not is_active():
        return values, indices
    counts = all_gather_counts(n_local, values.device)
    indices = indices + sum(counts[: rank_and_world()[0]])
    values, indices = all_gather_cat(values, dim=1), all_gather_cat(indices, dim=1)
    values, pos = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest)
    return values, torch.gather(indices, 1, pos)


def barrier() -> None:
    """Waits for every rank (no-op without a process group)."""
    if is_active():
        import torch.distributed as dist

        _arrive("barrier")
        dist.barrier()


def check_same_model(fingerprint: str) -> None:
    """Raises when the ranks hold different attributed weights."""
    prints = all_gather_objects(fingerprint)
    if len(set(prints)) > 1:
        differing = [r for r, p in enumerate(prints) if p != prints[0]]
        raise InfluenceError(
            f"Ranks {differing} hold different model weights than rank 0: every rank must load "
            "the same checkpoint before fitting or scoring."
        )


__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedTimeoutError",
    "all_gather_cat",
    "all_gather_counts",
    "all_gather_objects",
    "all_reduce_statistics",
    "all_reduce_sum",
    "barrier",
    "check_same_model",
    "is_active",
    "merge_top_k",
    "rank_and_world",
    "shard",
    "shard_bounds",
    "stage",
]
