"""Out-of-core pairwise scores: column blocks written into a memory-mapped ``.npy`` file.

``pairwise_scores(test, train, out="scores.npy")`` creates ``scores.npy.partial`` (a ``.npy``
file opened with :func:`numpy.lib.format.open_memmap`), writes each training batch's
``(n_test, B)`` block into its columns, and renames the file to ``scores.npy`` when every
column is written: a half-written matrix never appears under the final name. Memory holds the
preconditioned queries and one block, never the matrix.

Resuming: every ``checkpoint_every`` training batches the memory map is flushed and a small
JSON file ``scores.npy.progress-rank<r>of<W>.json`` records the batches done. A call killed
midway and run again with the same arguments skips the finished batches (their data is still
read, their gradients are not computed) and gives the same matrix. The progress files carry a
key (model weights, curvature, task, layout, sizes, number of processes), and the preconditioned
queries are saved next to the file (``scores.npy.factors.safetensors``): a resumed call checks
that its queries match the saved ones (to ``rtol=1e-4``, so GPU non-determinism does not
prevent resuming) and then scores with the saved ones, so the matrix stays consistent. On any
mismatch the partial file is started afresh.

Under ``torch.distributed`` rank 0 creates the file, every rank writes the columns of its
contiguous shard at its global offset, and rank 0 renames it (a shared file system is needed).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ._atomic import check_target
from ._loader import iterate_batches
from ._progress import logger, track
from .distributed import all_gather_counts, barrier, rank_and_world
from .estimator import check_finite
from .gradients.functional import per_sample_grads
from .io import load_tensors, save_tensors

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def count_examples(loader: Iterable[Any], task) -> int:
    """Examples in a loader: ``len(dataset)`` for a plain DataLoader, else one pass over it."""
    if isinstance(loader, DataLoader) and not loader.drop_last and loader.batch_size is not None:
        try:
            return len(loader.dataset)
        except TypeError:
            pass
    return sum(task.num_examples(b) for b in iterate_batches(loader, "train_loader"))


def _key(est, factors: torch.Tensor, n_train: int) -> str:
    from .params import parameter_fingerprint

    h = hashlib.sha256()
    for part in (parameter_fingerprint(est.model_, est.layout_), repr(est.curvature_), repr(est.task_),
                 json.dumps(est.layout_.to_dict()), tuple(factors.shape), n_train, rank_and_world()[1]):
        h.update(str(part).encode())
    return h.hexdigest()


def _same_queries(saved: torch.Tensor, factors: torch.Tensor) -> bool:
    """The saved preconditioned queries are those of this call (up to GPU non-determinism)."""
    if saved.shape != factors.shape or saved.dtype != factors.dtype:
        return False
    scale = float(factors.abs().max()) if factors.numel() else 0.0
    return bool(torch.allclose(saved.to(factors.device), factors, rtol=1e-4, atol=1e-6 * scale))


def _read_progress(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_progress(path: str, data: dict) -> None:
    from .io import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(data).encode()))


def _train_grads(est, batch: Any) -> torch.Tensor:
    """Per-example training gradients ``(B, P)``: the estimator's gradient engine when it has
    one (the hook path of the scoring branch), else torch.func."""
    engine = getattr(est, "gradients_", None)
    if engine is not None and hasattr(engine, "flat"):
        return engine.flat(batch, "loss")
    return per_sample_grads(est.model_, est.task_, batch, est.layout_, est.chunk_size, "loss")


def write_pairwise(est, factors: torch.Tensor, train: Iterable[Any], out: str, every: int = 50) -> np.memmap:
    """Writes ``factors @ G_trainᵀ`` to ``out`` block by block; returns it read-only."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer (batches); got {every!r}.")
    check_target(out)  # the final rename must not replace a link, a device or a directory
    rank, world = rank_and_world()
    dtype = _NP_DTYPES[factors.dtype]
    partial = out + ".partial"
    pattern = f"{glob.escape(out)}.progress-rank*.json"
    progress_path = f"{out}.progress-rank{rank}of{world}.json"
    factors_path = out + ".factors.safetensors"

    counts = all_gather_counts(count_examples(train, est.task_), factors.device)
    n_train, offset = sum(counts), sum(counts[:rank])
    key = _key(est, factors, n_train)
    shape = (factors.shape[0], n_train)

    if rank == 0:  # resume only when the partial file, the queries and every rank's progress match
        files = glob.glob(pattern)
        fresh = not os.path.exists(partial) or any((_read_progress(p) or {}).get("key") != key for p in files)
        if not fresh:
            try:
                mm = np.lib.format.open_memmap(partial, mode="r")
                fresh = mm.shape != shape or mm.dtype != dtype
                del mm
                fresh = fresh or not _same_queries(load_tensors(factors_path, "query-factors")[0]["factors"], factors)
            except (OSError, ValueError):
                fresh = True
        if fresh:
            for p in files:
                os.unlink(p)
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            mm = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
            mm.flush()
            del mm
            save_tensors(factors_path, {"factors": factors}, {"kind": "query-factors", "key": key})
    barrier()
    # every rank scores with the saved queries, so a resumed matrix is one consistent matrix
    # (cloned: a fresh, aligned buffer gives the same BLAS results as the in-memory path)
    factors = load_tensors(factors_path, "query-factors")[0]["factors"].to(factors.device).clone()
    done = (_read_progress(progress_path) or {}).get("batches", 0)
    if done:
        logger.info("pairwise_scores: resuming %s after %d training batches", out, done)
    mm = np.lib.format.open_memmap(partial, mode="r+")
    column = offset
    i = -1
    for i, batch in enumerate(track(iterate_batches(train, "train_loader"), "train scores", train)):
        n = est.task_.num_examples(batch)
        if i >= done:
            G = _train_grads(est, batch)
            check_finite(G, column - offset, "train")
            block = factors @ G.to(factors.dtype).T
            mm[:, column : column + n] = block.detach().cpu().numpy()
            if (i + 1) % every == 0:
                mm.flush()
                _write_progress(progress_path, {"key": key, "batches": i + 1})
        column += n
    if column - offset != counts[rank]:
        raise RuntimeError(
            f"The training loader yielded {column - offset} examples on rank {rank}, but "
            f"{counts[rank]} were counted before scoring: it must yield the same data on every pass."
        )
    mm.flush()
    del mm
    _write_progress(progress_path, {"key": key, "batches": i + 1})
    barrier()
    if rank == 0:
        os.replace(partial, out)
        for p in glob.glob(pattern) + [factors_path]:
            os.unlink(p)
    barrier()
    return np.load(out, mmap_mode="r")
