"""The driver of the curvature statistics protocol: shard, accumulate, checkpoint, reduce.

See :class:`~influence.curvature.Curvature` for the protocol. For each pass the driver

1. takes this rank's contiguous shard of the training loader (:func:`influence.distributed.shard`);
2. adds up the curvature's per-batch statistics (sums over examples), showing a progress bar;
3. every ``checkpoint_every`` batches, when a ``checkpoint_dir`` is set, saves the partial sums
   and the number of batches done (atomically), so that a killed run resumes from there and
   gives bit-identical results (the same additions in the same order);
4. all-reduces the sums over the ranks and calls ``_finalize``.

Checkpoints carry a key (curvature parameters, task, parameter layout, weights fingerprint,
pass, rank and world size) and a fingerprint of the data consumed so far (a running SHA-256 of
every batch's tensors, the number of batches and the batch sizes; see
:mod:`influence._fingerprint`). A resumed pass reads the batches the checkpoint covers again
(without computing them) and compares: a checkpoint with another key, or whose data or batching
differ, is refused with an error saying what differs, rather than mixed in; the checkpoint is
kept (delete it or use another ``checkpoint_dir`` to start over). While a fit runs, the
estimator holds an exclusive lock on ``<checkpoint_dir>/.lock``
(:func:`influence._files.exclusive_lock`), so a second fit into the same directory fails at
once. Checkpoints are deleted when the fit completes.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ._fingerprint import ConsumedData, resume_after
from ._loader import iterate_batches
from ._progress import current, logger, timed, track
from .distributed import all_gather_counts, all_reduce_statistics, rank_and_world, shard
from .curvature._base import check_finite_statistics
from .exceptions import InfluenceError
from .params import ParameterLayout, parameter_fingerprint


def _checkpoint_parts(curvature, task, layout: ParameterLayout, model: nn.Module, pass_index: int) -> dict[str, str]:
    """What a checkpoint must match, by name (the key hashes them; the error names those that differ)."""
    rank, world = rank_and_world()
    return {"curvature parameters": repr(curvature), "task": repr(task),
            "attributed parameters": hashlib.sha256(json.dumps(layout.to_dict()).encode()).hexdigest(),
            "model weights": parameter_fingerprint(model, layout), "pass": str(pass_index), "rank and world size": f"{rank}/{world}"}


def _checkpoint_key(curvature, task, layout: ParameterLayout, model: nn.Module, pass_index: int) -> str:
    parts = _checkpoint_parts(curvature, task, layout, model, pass_index)
    return hashlib.sha256(json.dumps(list(parts.values())).encode()).hexdigest()


def _checkpoint_path(directory: str, curvature, pass_index: int) -> str:
    rank, world = rank_and_world()
    return os.path.join(directory, f"fit-{type(curvature).__name__}-pass{pass_index}-rank{rank}of{world}.safetensors")


def _load_checkpoint(path: str, key: str, parts: dict[str, str]) -> tuple[dict[str, torch.Tensor] | None, dict | None, bool]:
    """``(partial sums, consumed-data state, complete)`` of the checkpoint at ``path``."""
    from .io import load_tensors

    if not os.path.exists(path):
        return None, None, False
    tensors, meta = load_tensors(path, "fit-checkpoint")
    if meta["key"] != key:
        saved = meta.get("parts") if isinstance(meta.get("parts"), dict) else {}
        differ = [k for k, v in parts.items() if saved.get(k) != v] if saved else []
        raise InfluenceError(
            f"The fit checkpoint {path} belongs to another run (different "
            + (", ".join(differ) if differ else "curvature parameters, task, attributed parameters, weights or number of processes")
            + "). Delete it, or use another checkpoint_dir."
        )
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {"batches": int(meta["batches"])}
    return (tensors or None), data, bool(meta["complete"])


def _save_checkpoint(path: str, key: str, stats, consumed: ConsumedData, complete: bool, parts: dict | None = None) -> None:
    from .io import save_tensors

    meta = {"kind": "fit-checkpoint", "key": key, "batches": consumed.batches, "complete": complete,
            "data": consumed.state(), "parts": parts or {}}
    save_tensors(path, stats or {}, meta)


def _first_global_index(local: Iterable[Any], task, model: nn.Module) -> int:
    """The global index of this rank's first training example: the number of examples in the
    shards of the ranks before it (shards are contiguous and in rank order). Counted without
    reading data for the DataLoader shards :func:`~influence.distributed.shard` makes and for
    lists of batches in memory; any other shard is read once more to count its examples."""
    rank, world = rank_and_world()
    if world == 1:
        return 0
    if isinstance(local, DataLoader) and isinstance(local.dataset, Subset) and not local.drop_last:
        count = len(local.dataset)
    else:
        count = sum(task.num_examples(b) for b in iterate_batches(local, "train_loader"))
    return sum(all_gather_counts(count, next(model.parameters()).device)[:rank])


def fit_statistics(curvature, model: nn.Module, task, loader: Iterable[Any], layout: ParameterLayout) -> None:
    """Fits ``curvature`` through its statistics protocol (see the module docstring)."""
    options = current()
    directory = options.checkpoint_dir
    local = shard(loader)
    rank, world = rank_and_world()
    first = _first_global_index(local, task, model) if curvature._draws_per_example() else 0
    name = type(curvature).__name__
    paths = []
    for p in range(curvature._num_passes):
        stats, saved, complete = None, None, False
        key = path = parts = None
        if directory is not None:
            parts = _checkpoint_parts(curvature, task, layout, model, p)
            key = _checkpoint_key(curvature, task, layout, model, p)
            path = _checkpoint_path(directory, curvature, p)
            paths.append(path)
            stats, saved, complete = _load_checkpoint(path, key, parts)
            if saved and saved.get("batches"):
                logger.info("%s pass %d: resuming after %d batches from %s", name, p, saved["batches"], path)
        with timed(f"fit.{name}.pass{p}"):
            desc = f"fit {name}" + (f" pass {p}" if curvature._num_passes > 1 else "") + (f" rank {rank}" if world > 1 else "")
            batches = iter(track(iterate_batches(local, "train_loader"), desc, local))
            consumed = None
            if path is not None:  # re-reads (not recomputes) the batches the checkpoint covers; checks them
                consumed = resume_after(batches, task, saved, complete, f"from the fit checkpoint {path}",
                                        f"Pass the data it was written with, or delete {path} (or use another checkpoint_dir) to start over.")
            if not complete:
                done, offset = (consumed.batches, consumed.examples) if consumed is not None else (0, 0)
                for i, batch in enumerate(batches, start=done):
                    n = task.num_examples(batch)
                    start, offset = offset, offset + n
                    if consumed is not None:
                        consumed.add(batch, n)
                    curvature._begin_batch(p, first + start)  # draws keyed on global example indices
                    s = curvature._batch_statistics(model, task, batch, layout, p)
                    for v in s.values():  # names the examples behind NaN/inf (shard-local indices)
                        check_finite_statistics(v, model, task, batch, layout, start)
                    if stats is None:
                        stats = s
                    else:
                        for k, v in s.items():
                            stats[k] += v
                    if path is not None and (i + 1) % options.checkpoint_every == 0:
                        _save_checkpoint(path, key, stats, consumed, False, parts)
                if path is not None:
                    _save_checkpoint(path, key, stats, consumed, True, parts)
            stats = all_reduce_statistics(stats)
            curvature._finalize(stats, layout, p)
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)
