"""Running top-k over streamed score blocks, shared by the estimator and the baselines."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def check_k(k) -> int:
    """Validates ``k`` (a positive integer)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}.")
    return k


def streaming_top_k(
    blocks: Iterable[torch.Tensor],
    k: int,
    largest: bool = True,
    reduce: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row over column blocks ``(n_test, b)`` arriving one at a time.

    Memory is ``O(n_test · (k + b))``: only the running best ``k`` columns are kept.

    Returns:
        ``(values, indices)``, each ``(n_test, k)``, most extreme first; indices count columns
        across all blocks in arrival order. ``reduce(values, indices, n_columns)`` may merge
        the running top-k with other processes' (see :func:`influence.distributed.merge_top_k`).

    Raises:
        ValueError: when ``k`` exceeds the total number of columns.
    """
    check_k(k)
    best_v = best_i = None
    offset = 0
    for s in blocks:
        idx = torch.arange(offset, offset + s.shape[1], device=s.device).expand_as(s)
        offset += s.shape[1]
        if best_v is not None:
            s, idx = torch.cat([best_v, s], 1), torch.cat([best_i, idx], 1)
        best_v, pos = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest)
        best_i = torch.gather(idx, 1, pos)
    if reduce is not None and best_v is not None:
        best_v, best_i = reduce(best_v, best_i, offset)
        offset = max(offset, best_v.shape[1])
    if best_v is None or best_v.shape[1] < k:
        raise ValueError(f"k={k} exceeds the number of training examples ({offset}).")
    return best_v, best_i
