"""Resident query groups saved next to a score file, so that a resumed run scores with them.

A resumed ``pairwise_scores(out=...)`` recomputes its queries; on a GPU they may differ from
the saved ones in the last bits. :func:`pin` makes every rank, and every resumption, score a
group with one set of queries: rank 0 saves the group (``queries-g<g>-<k>.npy``, raw bytes, and
``queries-g<g>.json`` listing the parts, written last), or, when it is saved already, compares
the recomputed queries with it (``rtol=1e-4``, ``atol=1e-6·max|q|``) and copies the saved values
into the recomputed tensors in place; the other ranks copy the saved values too. Copies go in
chunks, so no second copy of a group is ever resident. The files are only read as raw bytes
into tensors whose shapes and dtypes this run computed itself.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ._progress import logger
from .distributed import all_gather_objects, rank_and_world
from .io import atomic_write

_CHUNK = 1 << 24  # bytes per copied or compared chunk


def _parts(group: dict) -> list[tuple[str, str, torch.Tensor]]:
    return [(name, part, t) for name, e in group.items() for part, t in e.items()]


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)  # the group's tensors are contiguous


def _describe(group: dict) -> list:
    return [[name, part, str(t.dtype), list(t.shape)] for name, part, t in _parts(group)]


def _save(directory: str, g: int, group: dict, key: str) -> None:
    for k, (_, _, t) in enumerate(_parts(group)):
        atomic_write(os.path.join(directory, f"queries-g{g}-{k}.npy"), lambda f, t=t: np.save(f, _raw(t).cpu().numpy()))
    manifest = {"key": key, "parts": _describe(group)}
    atomic_write(os.path.join(directory, f"queries-g{g}.json"), lambda f: f.write(json.dumps(manifest).encode()))


def _saved(directory: str, g: int, group: dict, key: str) -> list | None:
    """The memory maps of the saved parts of group ``g`` when they match this group's layout."""
    try:
        with open(os.path.join(directory, f"queries-g{g}.json")) as f:
            manifest = json.load(f)
        if manifest.get("key") != key or manifest.get("parts") != _describe(group):
            return None
        maps = [np.load(os.path.join(directory, f"queries-g{g}-{k}.npy"), mmap_mode="r", allow_pickle=False)
                for k in range(len(manifest["parts"]))]
    except (OSError, ValueError):
        return None
    ok = all(m.dtype == np.uint8 and m.shape == (t.numel() * t.element_size(),) for m, (_, _, t) in zip(maps, _parts(group)))
    return maps if ok else None


def _close(saved: np.ndarray, t: torch.Tensor) -> bool:
    raw = _raw(t)
    scale = float(t.abs().max()) if t.is_floating_point() and t.numel() else 0.0
    step = max(_CHUNK // t.element_size(), 1) * t.element_size()
    for s in range(0, raw.numel(), step):
        a = torch.from_numpy(np.array(saved[s : s + step])).view(t.dtype).to(t.device)
        b = raw[s : s + step].view(t.dtype)
        same = torch.allclose(a, b, rtol=1e-4, atol=1e-6 * scale) if t.is_floating_point() else torch.equal(a, b)
        if not same:
            return False
    return True


def _copy_into(saved: np.ndarray, t: torch.Tensor) -> None:
    raw = _raw(t)
    for s in range(0, raw.numel(), _CHUNK):
        raw[s : s + _CHUNK].copy_(torch.from_numpy(np.array(saved[s : s + _CHUNK])))


def pin(directory: str, g: int, group: dict, key: str) -> bool:
    """Makes every rank score query group ``g`` with the saved values (see the module
    docstring). Returns ``True`` when the saved queries did not match the recomputed ones (then
    rank 0 saved the recomputed ones and the group's columns must be computed afresh)."""
    rank = rank_and_world()[0]
    stale = False
    if rank == 0:
        saved = _saved(directory, g, group, key)
        if saved is not None and all(_close(m, t) for m, (_, _, t) in zip(saved, _parts(group))):
            for m, (_, _, t) in zip(saved, _parts(group)):
                _copy_into(m, t)
        else:
            stale = saved is not None or os.path.exists(os.path.join(directory, f"queries-g{g}.json"))
            if stale:
                logger.warning("pairwise_scores: the saved queries of group %d differ from the recomputed ones; "
                               "its columns are computed afresh", g)
            _save(directory, g, group, key)
        del saved
    stale = bool(all_gather_objects(stale)[0])  # also waits for rank 0's files
    if rank != 0:
        saved = _saved(directory, g, group, key)
        if saved is None:
            raise RuntimeError(f"Rank {rank} cannot read the queries rank 0 saved in {directory}: the ranks must share a file system.")
        for m, (_, _, t) in zip(saved, _parts(group)):
            _copy_into(m, t)
    return stale
