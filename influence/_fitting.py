"""The driver of the curvature statistics protocol: shard, accumulate, checkpoint, reduce.

See :class:`~influence.curvature.Curvature` for the protocol. For each pass the driver

1. takes this rank's contiguous shard of the training loader (:func:`influence.distributed.shard`);
2. adds up the curvature's per-batch statistics (sums over examples), showing a progress bar;
3. every ``checkpoint_every`` batches, when a ``checkpoint_dir`` is set, saves the partial sums
   and the number of batches done (atomically), so that a killed run resumes from there and
   gives bit-identical results (the same additions in the same order);
4. all-reduces the sums over the ranks and calls ``_finalize``.

Checkpoints carry a key (curvature parameters, task, parameter layout, weights fingerprint,
pass, rank and world size); a checkpoint with another key is refused rather than mixed in.
They are deleted when the fit completes.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ._loader import iterate_batches
from ._progress import current, logger, timed, track
from .distributed import all_gather_counts, all_reduce_statistics, rank_and_world, shard
from .curvature._base import check_finite_statistics
from .exceptions import InfluenceError
from .params import ParameterLayout, parameter_fingerprint


def _checkpoint_key(curvature, task, layout: ParameterLayout, model: nn.Module, pass_index: int) -> str:
    rank, world = rank_and_world()
    parts = [repr(curvature), repr(task), json.dumps(layout.to_dict()), parameter_fingerprint(model, layout), pass_index, rank, world]
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


def _checkpoint_path(directory: str, curvature, pass_index: int) -> str:
    rank, world = rank_and_world()
    return os.path.join(directory, f"fit-{type(curvature).__name__}-pass{pass_index}-rank{rank}of{world}.safetensors")


def _load_checkpoint(path: str, key: str) -> tuple[dict[str, torch.Tensor] | None, int, bool]:
    from .io import load_tensors

    if not os.path.exists(path):
        return None, 0, False
    tensors, meta = load_tensors(path, "fit-checkpoint")
    if meta["key"] != key:
        raise InfluenceError(
            f"The fit checkpoint {path} belongs to another run (different curvature "
            "parameters, task, attributed parameters, weights or number of processes). Delete "
            "it, or use another checkpoint_dir."
        )
    return (tensors or None), int(meta["batches"]), bool(meta["complete"])


def _save_checkpoint(path: str, key: str, stats, batches: int, complete: bool) -> None:
    from .io import save_tensors

    save_tensors(path, stats or {}, {"kind": "fit-checkpoint", "key": key, "batches": batches, "complete": complete})


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
        stats, done, complete = None, 0, False
        key = path = None
        if directory is not None:
            key = _checkpoint_key(curvature, task, layout, model, p)
            path = _checkpoint_path(directory, curvature, p)
            paths.append(path)
            stats, done, complete = _load_checkpoint(path, key)
            if done:
                logger.info("%s pass %d: resuming after %d batches from %s", name, p, done, path)
        with timed(f"fit.{name}.pass{p}"):
            if not complete:
                desc = f"fit {name}" + (f" pass {p}" if curvature._num_passes > 1 else "") + (f" rank {rank}" if world > 1 else "")
                i, offset = -1, 0
                for i, batch in enumerate(track(iterate_batches(local, "train_loader"), desc, local)):
                    start, offset = offset, offset + task.num_examples(batch)
                    if i < done:
                        continue  # finished before the checkpoint
                    curvature._begin_batch(p, first + start)
                    s = curvature._batch_statistics(model, task, batch, layout, p)
                    for v in s.values():  # names the examples behind NaN/inf (shard-local indices)
                        check_finite_statistics(v, model, task, batch, layout, start)
                    if stats is None:
                        stats = s
                    else:
                        for k, v in s.items():
                            stats[k] += v
                    if path is not None and (i + 1) % options.checkpoint_every == 0:
                        _save_checkpoint(path, key, stats, i + 1, False)
                if path is not None:
                    _save_checkpoint(path, key, stats, i + 1, True)
            stats = all_reduce_statistics(stats)
            curvature._finalize(stats, layout, p)
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)
