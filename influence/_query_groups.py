"""Resident query groups of :class:`influence.scoring.Scorer`: one preallocated set of tensors
per group, filled batch by batch (no concatenation copies), and finiteness checks of queries
and score blocks."""

from __future__ import annotations

import torch

from ._guards import check_finite
from .gradients.hooks import BatchGrads


def _first(bg: BatchGrads) -> torch.Tensor:
    return next(iter(bg.layers.values())).g if bg.layers else bg.rest


def _n(block) -> int:
    return next(iter(next(iter(block.values())).values())).shape[0]


class _Group:
    """One group of resident queries, allocated once (``size`` rows, shaped like the first
    block) and filled by row ranges of the blocks. Ghost factors ``L``/``R`` of different
    lengths (dim 1: tokens) are zero-padded to the longest, which adds nothing to the scores."""

    def __init__(self, block: dict, size: int):
        self.size, self.filled = size, 0
        self.parts = {name: {p: t.new_zeros((size, *t.shape[1:])) for p, t in e.items()} for name, e in block.items()}

    @property
    def free(self) -> int:
        return self.size - self.filled

    def put(self, block: dict, i: int, j: int) -> None:
        rows = slice(self.filled, self.filled + j - i)
        for name, e in block.items():
            for p, t in e.items():
                dest = self.parts[name][p]
                if t.dim() >= 2 and t.shape[1] > dest.shape[1]:  # longer ghost factors: grow
                    grown = dest.new_zeros((dest.shape[0], t.shape[1], *dest.shape[2:]))
                    grown[:, : dest.shape[1]] = dest
                    dest = self.parts[name][p] = grown
                if t.dim() >= 2:
                    dest[rows, : t.shape[1]] = t[i:j]
                else:
                    dest[rows] = t[i:j]
        self.filled += j - i

    def trimmed(self) -> dict:
        return {name: {p: t[: self.filled] for p, t in e.items()} for name, e in self.parts.items()}


def _check_finite_block(block, offset) -> None:
    for e in block.values():
        for t in e.values():
            if t.is_floating_point():
                check_finite(t, offset, "test")


def _check_finite_scores(s: torch.Tensor, offset: int) -> None:
    check_finite(s.T, offset, "train")
