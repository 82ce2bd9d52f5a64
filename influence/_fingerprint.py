"""Fingerprints of the data a run consumes: what a resume and a distributed run check.

**Batch digest.** :func:`batch_digest` is a SHA-256 over the batch's structure and leaves, in
order: a tensor or numpy array contributes its dtype, shape and raw bytes (a tensor on an
accelerator is copied to the CPU first; SHA-256 runs at about 1 GB/s per core), strings, bytes,
numbers, booleans and ``None`` their ``repr``, mappings their sorted keys and values, lists
and tuples their items; any other object contributes only its type name.

**Consumed data.** :class:`ConsumedData` chains the digests of the batches a pass has read,
with the number of batches, of examples and the sizes of the batches (run-length encoded). A
checkpoint stores it; a resumed pass reads the batches the checkpoint covers again (without
computing anything), recomputes it and compares (:func:`resume_after`): other contents, other
batch sizes, fewer or more batches are refused with a message saying what differs, before any
new batch is added. Under ``torch.distributed`` the ranks agree on the verdict (one gather), so
every rank raises together.

**Inputs across ranks.** :func:`check_same_inputs` runs at the start of each stage under
``torch.distributed`` and compares what every rank must see identically (gathered, cheap):

- the training loader: a DataLoader over a sized dataset by its number of examples and the
  digests of the examples at each rank's shard start and of the last example (read from the
  dataset and collated one by one); a list of batches by its number of batches and examples
  and the digests of the batches at each shard start and of the last batch; any other sized
  iterable by its number of batches and the digest of its first batch;
- the queries: their number and the digest of every query batch (one reading pass).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .exceptions import InfluenceError


def _update(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel() and t.layout == torch.strided:
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray) and obj.dtype != object:
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).view(np.uint8).reshape(-1))
    elif obj is None or isinstance(obj, (str, bytes, int, float, bool, complex)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            _update(h, key)
            _update(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _update(h, item)
    else:
        h.update(f"O{type(obj).__qualname__};".encode())


def batch_digest(batch: Any) -> str:
    """SHA-256 (hex) of a batch's structure and contents (see the module docstring).

    Examples:
        >>> import torch
        >>> a = batch_digest((torch.arange(3), torch.zeros(3)))
        >>> a == batch_digest((torch.arange(3), torch.zeros(3))), a == batch_digest((torch.arange(3), torch.ones(3)))
        (True, False)
    """
    h = hashlib.sha256()
    _update(h, batch)
    return h.hexdigest()


class ConsumedData:
    """Running fingerprint of the batches a pass has read (see the module docstring)."""

    def __init__(self) -> None:
        self.batches, self.examples, self.sizes = 0, 0, []  # sizes: [[size, repeats], ...]
        self._chain = hashlib.sha256(b"influence-data-v1").hexdigest()

    def add(self, batch: Any, num_examples: int) -> None:
        self._chain = hashlib.sha256(f"{self._chain}{num_examples}:{batch_digest(batch)}".encode()).hexdigest()
        self.batches += 1
        self.examples += num_examples
        if self.sizes and self.sizes[-1][0] == num_examples:
            self.sizes[-1][1] += 1
        else:
            self.sizes.append([num_examples, 1])

    def state(self) -> dict:
        """JSON-able summary, stored in checkpoints."""
        return {"batches": self.batches, "examples": self.examples, "sizes": [list(s) for s in self.sizes], "sha256": self._chain}

    def difference(self, saved: dict) -> str | None:
        """What differs from a saved :meth:`state` of the same number of batches, or ``None``."""
        if not isinstance(saved, dict) or "sha256" not in saved:
            return "the checkpoint records no fingerprint of its data (written by an older version)"
        if saved.get("sizes") != self.sizes or saved.get("examples") != self.examples:
            return (
                f"other batching: the checkpoint's first {saved.get('batches')} batches held "
                f"{saved.get('examples')} examples in batches of {_sizes(saved.get('sizes'))}; this "
                f"loader's first {self.batches} hold {self.examples} in batches of {_sizes(self.sizes)} "
                "(resuming would count examples twice or skip them)"
            )
        if saved["sha256"] != self._chain:
            return (
                f"other data: the first {self.batches} batches have the checkpoint's sizes but other "
                "contents (SHA-256 of their tensors; resuming would mix two data sets)"
            )
        return None


def _sizes(sizes) -> str:
    if not isinstance(sizes, list):
        return repr(sizes)
    parts = [f"{s}" if r == 1 else f"{s}×{r}" for s, r in sizes[:6]]
    return "[" + ", ".join(parts) + (", ..." if len(sizes) > 6 else "") + "]"


def resume_after(batches: Iterator[Any], task, saved: dict | None, complete: bool, where: str, restart: str) -> ConsumedData:
    """Reads the ``saved["batches"]`` batches a checkpoint covers from ``batches`` (advancing
    it) and checks them against ``saved``; returns the running fingerprint, to be continued.

    Args:
        batches: an iterator over the pass's batches, positioned at its start.
        saved: the checkpoint's :meth:`ConsumedData.state` (``None``: nothing to resume).
        complete: the checkpoint covers the whole pass (the loader must then end there).
        where: names the checkpoint in the error; ``restart``: how to start over.

    Raises:
        InfluenceError: on this and every other rank, when any rank's data differ.
    """
    from .distributed import all_gather_objects

    consumed, problem = ConsumedData(), None
    done = int(saved.get("batches", 0)) if isinstance(saved, dict) else 0
    examples = saved.get("examples", 0) if isinstance(saved, dict) else 0
    try:
        while consumed.batches < done and consumed.examples <= examples:  # past them: other batching
            batch = next(batches)
            consumed.add(batch, task.num_examples(batch))
        if done:
            problem = consumed.difference(saved)
        if problem is None and complete and next(batches, _END) is not _END:
            problem = f"more batches: the loader yields more than the {done} batches of the completed pass"
    except StopIteration:
        problem = (
            f"fewer batches: the loader ended after {consumed.batches} batches ({consumed.examples} "
            f"examples in batches of {_sizes(consumed.sizes)}); the checkpoint's {done} held "
            f"{examples} in batches of {_sizes(saved.get('sizes'))}"
        )
    verdicts = all_gather_objects(problem)
    bad = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if bad:
        who = "; ".join(v if len(verdicts) == 1 else f"rank {r}: {v}" for r, v in bad)
        raise InfluenceError(f"Cannot resume {where}: {who}. {restart}")
    return consumed


_END = object()


# --------------------------------------------------------------------------- across ranks
def _at(loader: Any, task, world: int) -> dict:
    from .distributed import _splittable_by_examples, shard_bounds

    if isinstance(loader, DataLoader) and _splittable_by_examples(loader):
        n = len(loader.dataset)
        idx = sorted({shard_bounds(n, r, world)[0] for r in range(world)} | {n - 1})
        return {"examples": n, "example digests": {i: batch_digest(loader.collate_fn([loader.dataset[i]])) for i in idx if i >= 0}}
    if isinstance(loader, Sequence):
        n = len(loader)
        idx = sorted({shard_bounds(n, r, world)[0] for r in range(world)} | {n - 1})
        return {"batches": n, "examples": sum(task.num_examples(b) for b in loader),
                "batch digests": {i: batch_digest(loader[i]) for i in idx if i >= 0}}
    try:
        n = len(loader)
    except TypeError:
        n = None
    first = next(iter(loader), None)
    return {"batches": n, "first batch digest": None if first is None else batch_digest(first)}


def query_fingerprint(test_loader: Iterable[Any], task) -> tuple[int, str]:
    """``(number of queries, digest of every query batch)``: one reading pass, no gradients."""
    from ._loader import iterate_batches

    consumed = ConsumedData()
    for batch in iterate_batches(test_loader, "test_loader"):
        consumed.add(batch, task.num_examples(batch))
    return consumed.examples, consumed.state()["sha256"]


def check_same_inputs(stage: str, task, train: Any = None, test: Any = None) -> None:
    """Refuses to run ``stage`` when the ranks were given different training data or queries
    (see the module docstring). A no-op without ``torch.distributed``."""
    from .distributed import all_gather_objects, rank_and_world

    rank, world = rank_and_world()
    if world == 1:
        return
    mine: dict[str, Any] = {}
    if train is not None:
        mine["training data"] = _at(train, task, world)
    if test is not None:
        mine["queries"] = dict(zip(("count", "digest"), query_fingerprint(test, task)))
    everyone = all_gather_objects(mine)
    problems = []
    for what in mine:
        differing = [r for r, f in enumerate(everyone) if f.get(what) != everyone[0].get(what)]
        if differing:
            fields = sorted(k for r in differing for k in set(everyone[r][what]) | set(everyone[0][what])
                            if everyone[r][what].get(k) != everyone[0][what].get(k))
            problems.append(f"the {what} of rank(s) {differing} differ from rank 0's ({', '.join(dict.fromkeys(fields))})")
    if problems:
        raise InfluenceError(
            f"{stage}: {'; '.join(problems)}. Every rank must be given the same loaders (each "
            "processes its own shard of the same training set, and every rank scores all the "
            "queries): build them identically on every rank (same files, order and seeds)."
        )
