"""Out-of-core pairwise scores: blocks written into a memory-mapped ``.npy`` file.

``pairwise_scores(test, train, out="scores.npy")`` scores through the same
:class:`~influence.scoring.Scorer` as the in-memory path (same plan, same numbers, ``plan_``
set) and writes each training batch's ``(group rows, B)`` block into ``scores.npy.partial`` (a
``.npy`` file opened with :func:`numpy.lib.format.open_memmap`); the file is renamed to
``scores.npy`` when every entry is written, so a half-written matrix never appears under the
final name. Memory holds one group of resident queries (all of them unless
``ScoringConfig(max_memory=...)`` splits them; one training pass per group) and one block,
never the matrix. With ``aggregate_queries`` the file holds one row, the aggregated query's
(:mod:`influence._aggregate`); per-module and per-token splits are not written to files.

Before any gradient is computed, the run

1. takes an exclusive lock on ``scores.npy.lock`` (a second run writing the same file fails at
   once, :func:`influence._files.exclusive_lock`);
2. reserves the file's full size on disk (:func:`influence._files.reserve`): a disk too small
   is an ``OSError`` naming the path and the bytes needed, not a SIGBUS midway.

Resuming: every ``checkpoint_every`` training batches the memory map is flushed and
``scores.npy.resume/progress-rank<r>of<W>.json`` records the group and the batches done, with a
fingerprint of the training data consumed (a running SHA-256 of the batches' tensors, their
number and sizes; :mod:`influence._fingerprint`), the fingerprints of the first pass at each
checkpoint, and the run's identity: model weights, curvature, task, attributed parameters,
scoring configuration, score dtype, gradient method, the queries (number and SHA-256 of their
batches), the number of training examples and of processes. A call run again with the same
arguments skips the finished groups and batches (their data is read again, not scored) and
gives the same matrix. A partial file of another run, or a loader whose data or batching differ
from the checkpoint's, is refused with an error saying what differs: nothing is overwritten;
delete ``scores.npy.partial`` and ``scores.npy.resume/`` (or write to another path) to start
over. The query groups are saved in ``scores.npy.resume/`` so that a resumed run scores with the
same values (:mod:`influence._query_store`).

Under ``torch.distributed`` rank 0 locks and creates the file, every rank writes the columns of
its contiguous shard at its global offset, and rank 0 renames it (a shared file system is
needed).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ._atomic import check_target
from ._files import exclusive_lock, reserve
from ._fingerprint import ConsumedData, query_fingerprint, resume_after
from ._loader import iterate_batches
from ._progress import logger, track
from ._query_store import pin
from .distributed import all_gather_counts, all_gather_objects, barrier, rank_and_world
from .exceptions import InfluenceError
from .io import atomic_write
from ._query_groups import _check_finite_scores, _n

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def count_examples(loader: Iterable[Any], task) -> int:
    """Examples in a loader: ``len(dataset)`` for a plain DataLoader, else one pass over it."""
    if isinstance(loader, DataLoader) and not loader.drop_last and loader.batch_size is not None:
        try:
            return len(loader.dataset)
        except TypeError:
            pass
    return sum(task.num_examples(b) for b in iterate_batches(loader, "train_loader"))


def _run_parts(est, scorer, n_test: int, queries: str, n_train: int) -> dict[str, str]:
    """What a partial file must match to be resumed, by name."""
    from .params import parameter_fingerprint

    parts = {"model weights": parameter_fingerprint(est.model_, est.layout_), "curvature": repr(est.curvature_),
             "task": repr(est.task_), "attributed parameters": json.dumps(est.layout_.to_dict()),
             "scoring configuration": repr(scorer.config), "score dtype": str(est.score_dtype),
             "gradient method": str(est.gradient_method), "queries": f"{n_test} queries, SHA-256 {queries}",
             "number of training examples": str(n_train), "number of processes": str(rank_and_world()[1])}
    if scorer.aggregate is not None:  # (absent otherwise: files of earlier runs still resume)
        parts["query aggregation"] = scorer.aggregate
    return parts


def _key(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Files:
    """The paths of one score file and its resume state."""

    def __init__(self, out: str):
        rank, world = rank_and_world()
        self.out, self.partial, self.resume = out, out + ".partial", out + ".resume"
        self.progress = os.path.join(self.resume, f"progress-rank{rank}of{world}.json")

    def restart_hint(self) -> str:
        return f"Delete {self.partial} and {self.resume}{os.sep} (or write to another out= path) to start over."

    def prepare(self, parts: dict, shape: tuple[int, int], dtype) -> None:
        """Rank 0: checks that a partial file belongs to this run, or creates and reserves one."""
        progress = sorted(glob.glob(os.path.join(glob.escape(self.resume), "progress-rank*.json")))
        if os.path.exists(self.partial) and progress:
            for path in progress:
                saved = _read(path) or {}
                if saved.get("key") != _key(parts):
                    old = saved.get("parts") if isinstance(saved.get("parts"), dict) else {}
                    differ = [k for k in {**parts, **old} if old.get(k) != parts.get(k)] or ["format (written by another version)"]
                    raise InfluenceError(
                        f"Cannot resume {self.partial}: it was written by another run (different "
                        f"{', '.join(differ)}). {self.restart_hint()}"
                    )
            try:
                mm = np.lib.format.open_memmap(self.partial, mode="r")
                ok = mm.shape == shape and mm.dtype == dtype
                del mm
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise InfluenceError(f"Cannot resume {self.partial}: it is not a {shape} {np.dtype(dtype)} .npy file. {self.restart_hint()}")
            return
        # nothing recorded yet: whatever is left belongs to no resumable run
        shutil.rmtree(self.resume, ignore_errors=True)
        os.makedirs(self.resume)
        mm = np.lib.format.open_memmap(self.partial, mode="w+", dtype=dtype, shape=shape)
        offset, nbytes = mm.offset, mm.nbytes
        del mm
        try:
            reserve(self.partial, offset + nbytes, offset)
        except OSError:
            os.unlink(self.partial)
            shutil.rmtree(self.resume, ignore_errors=True)
            raise

    def save(self, state: dict) -> None:
        atomic_write(self.progress, lambda f: f.write(json.dumps(state).encode()))


def write_pairwise(est, scorer, test_loader: Iterable[Any], train: Iterable[Any], out: str, every: int = 50) -> np.memmap:
    """Writes the pairwise scores to ``out`` (see the module docstring); returns it read-only."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer (batches); got {every!r}.")
    check_target(out)  # the final rename must not replace a link, a device or a directory
    with exclusive_lock(out + ".lock", f"The score file {out}"):
        _write(est, scorer, test_loader, train, _Files(out), every)
    return np.load(out, mmap_mode="r")


def _write(est, scorer, test_loader, train, files: _Files, every: int) -> None:
    rank, world = rank_and_world()
    task = est.task_
    counts = all_gather_counts(count_examples(train, task))
    n_test, queries = query_fingerprint(test_loader, task)
    parts = _run_parts(est, scorer, n_test, queries, sum(counts))
    key = _key(parts)
    if rank == 0:  # aggregated queries: one row
        rows = 1 if scorer.aggregate is not None else n_test
        files.prepare(parts, (rows, sum(counts)), np.dtype(_NP_DTYPES[est.score_dtype]))
    barrier()
    state = _read(files.progress) or {}
    at_group, marks = int(state.get("group", 0)), dict(state.get("marks") or {})
    if at_group or state.get("data"):
        logger.info("pairwise_scores: resuming %s at query group %d after %d training batches", files.out, at_group,
                    (state.get("data") or {}).get("batches", 0))
    mm = np.lib.format.open_memmap(files.partial, mode="r+")
    row, g, first = 0, -1, min(all_gather_objects(at_group))  # the ranks pin the groups in lockstep
    for group in scorer.query_groups(test_loader, n_test):  # (enumerate would keep the last group alive)
        g, rows = g + 1, _n(group)
        stale = g >= first and pin(files.resume, g, group, key)
        if g >= at_group or stale:  # stale: saved queries replaced, every rank redoes the group
            saved = state.get("data") if g == at_group and not stale else None
            _pass(scorer, group, train, mm, (row, row + rows), sum(counts[:rank]), counts[rank], saved, marks,
                  lambda data, g=g: files.save({"key": key, "parts": parts, "group": g, "data": data, "marks": marks}), every, files)
            mm.flush()
            files.save({"key": key, "parts": parts, "group": g + 1, "data": None, "marks": marks})
        row += rows
        del group  # before the next group is prepared
    del mm
    barrier()
    if rank == 0:
        os.replace(files.partial, files.out)
        shutil.rmtree(files.resume, ignore_errors=True)
    barrier()


def _pass(scorer, group, train, mm, rows, offset, expected, saved, marks, save, every, files) -> None:
    """One training pass for one query group: writes ``mm[rows, offset:offset+expected]``."""
    task = scorer.computer.task
    batches = iter(track(iterate_batches(train, "train_loader"), "train scores", train))
    consumed = resume_after(batches, task, saved, False, f"{files.partial} from {files.progress}",
                            f"Pass the data it was written with. {files.restart_hint()}")
    column = offset + consumed.examples
    for batch in batches:
        n = task.num_examples(batch)
        consumed.add(batch, n)
        block = scorer.score_batch(group, scorer.computer.compute(batch, "loss"))
        _check_finite_scores(block, column - offset)
        mm[rows[0] : rows[1], column : column + n] = block.detach().cpu().numpy()
        column += n
        if consumed.batches % every == 0:
            _check_mark(marks, consumed, files)
            mm.flush()
            save(consumed.state())
    if column - offset != expected:
        raise RuntimeError(
            f"The training loader yielded {column - offset} examples on rank {rank_and_world()[0]}, but "
            f"{expected} were counted before scoring: it must yield the same data on every pass."
        )
    _check_mark(marks, consumed, files)


def _check_mark(marks: dict, consumed: ConsumedData, files: _Files) -> None:
    """Every pass (one per query group) must read the data of the first pass: compared at each
    checkpoint the first pass recorded, before any progress past it is saved."""
    mark, state = str(consumed.batches), consumed.state()
    if mark not in marks:
        marks[mark] = state["sha256"]
    elif marks[mark] != state["sha256"]:
        raise InfluenceError(
            f"The training loader yielded other data for this query group than for the first one "
            f"(its first {consumed.batches} batches differ): every pass must read the same data. "
            f"Fix the loader (no shuffling, no random augmentation), then resume. ({files.partial})"
        )
