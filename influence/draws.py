"""Counter-based random numbers for the true Fisher's sampled targets, keyed per example.

A true-Fisher fit (``KFAC``/``EKFAC``/``Diagonal`` with ``fisher_type="true"``) draws targets
from the model's predictive distribution. Drawing them from a stateful generator makes them
depend on how the data is cut: the batch size, the number of processes, where a resumed run
starts. Here every random number is instead a **hash of its key**
``(seed, stream, global example index, position)``: the stream names the draw (e.g. the fit's
pass and the sample number ``k``), the position is the flat index within the example (the token
position of a language model's target, the output coordinate of a regression). So an example's
targets are the same whatever batch, rank or resumed run it is processed in, and the fit is
the same to float rounding.

The hash is ``lowbias32`` (C. Wellons' integer-hash prospector: xor-shift / multiply rounds,
full avalanche), chained over the 32-bit words of the key, in two independent lanes whose
outputs form the 53 bits of a float64 uniform. It runs as vectorised int64 tensor operations
that never overflow (every product is below ``2⁴⁹``), so the numbers are identical on every
device and platform, and cost a few dozen elementwise operations per number.

Examples:
    >>> import torch
    >>> draws = TargetDraws(seed=0, example_index=torch.arange(5))
    >>> u = draws.uniform((3,))        # 3 positions per example, in [0, 1)
    >>> u.shape, bool(((u >= 0) & (u < 1)).all())
    (torch.Size([5, 3]), True)
    >>> later = TargetDraws(seed=0, example_index=torch.arange(2, 5))  # another batching
    >>> torch.equal(later.uniform((3,)), u[2:])
    True
    >>> torch.equal(draws.substream(1).uniform((3,)), u)  # sample k = 1 draws anew
    False
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_LANES = (0x243F6A88, 0x85A308D3)  # initial states of the two lanes (digits of π)


def _mul32(x, c: int):
    """``x · c mod 2³²`` for ``0 <= x, c < 2³²`` (``x`` an int or int64 tensor), without
    overflow: with ``c = c_hi·2¹⁶ + c_lo`` both products stay below ``2⁴⁸``."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """lowbias32: a bijection of ``[0, 2³²)`` with full avalanche (int or int64 tensor)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _words(value: int) -> tuple[int, int]:
    """The low and high 32-bit words of ``value mod 2⁶⁴`` (a negative seed wraps)."""
    value %= 2**64
    return value & _MASK32, value >> 32


def _absorb(state, words):
    """Chains ``words`` into ``state``: ``state ← mix(state ⊕ word)``, a bijection per word."""
    for w in words:
        state = _mix32(state ^ w)
    return state


def _tensor_words(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of non-negative int64 ``values``."""
    return values & _MASK32, values >> 32


class TargetDraws:
    """Uniform and normal numbers keyed by ``(seed, stream, example index, position)``.

    The random numbers handed to :meth:`~influence.tasks.OutputTask.sample_targets`. Row ``b``
    of every draw belongs to the example whose global index (its position in the training
    loader, counted over all processes) is ``example_index[b]``; entry ``(b, *pos)`` of
    ``uniform(shape)`` depends only on the seed, the stream, that index and the flat position
    of ``pos`` in ``shape``. Positions therefore stay put when only the leading size of the
    batch changes, and the token positions of right-padded sequences keep their keys whatever
    the padded length (left padding shifts them: the draws still follow the right
    distribution, but differ between paddings).

    Args:
        seed: the curvature's ``seed`` (any int; taken modulo ``2⁶⁴``).
        example_index: ``(B,)`` int64 global indices of the batch's examples (``>= 0``); the
            draws live on its device.
        stream: non-negative ints naming the draw (the fit uses ``(pass, sample k)``).

    Examples:
        >>> import torch
        >>> from influence.tasks import sample_categorical
        >>> draws = TargetDraws(7, torch.arange(4), stream=(0, 0))
        >>> sample_categorical(torch.zeros(4, 3), draws.uniform()).shape  # one class per example
        torch.Size([4])
        >>> draws.normal((2,)).dtype
        torch.float64
    """

    def __init__(self, seed: int, example_index: torch.Tensor, stream: Sequence[int] = ()):
        if not isinstance(example_index, torch.Tensor) or example_index.dim() != 1 or example_index.is_floating_point():
            raise TypeError(
                "TargetDraws: example_index must be a 1-D integer tensor (B,) of global example "
                f"indices; got {example_index!r:.80}."
            )
        if example_index.numel() and int(example_index.min()) < 0:
            raise ValueError("TargetDraws: example indices must be >= 0 (global positions in the training data).")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in stream):
            raise ValueError(f"TargetDraws: stream must hold non-negative ints; got {tuple(stream)!r}.")
        self.seed = int(seed)
        self.example_index = example_index.long()
        self.stream = tuple(stream)

    def substream(self, *keys: int) -> "TargetDraws":
        """The same examples under the stream extended by ``keys`` (independent numbers)."""
        return TargetDraws(self.seed, self.example_index, self.stream + keys)

    def uniform(self, shape: Sequence[int] = (), channel: int = 0) -> torch.Tensor:
        """``(B, *shape)`` float64 uniforms in ``[0, 1)`` (multiples of ``2⁻⁵³``).

        ``channel`` selects independent numbers for the same positions (e.g. the two
        uniforms of a Box-Muller normal).
        """
        shape = tuple(int(s) for s in shape)
        keys = (self.seed, len(self.stream), *self.stream, channel)
        prefix = [w for key in keys for w in _words(key)]
        lo, hi = _tensor_words(self.example_index)
        size = math.prod(shape)
        if size > _MASK32:
            raise ValueError(f"TargetDraws: at most 2³² positions per example; got shape {shape}.")
        positions = torch.arange(size, device=self.example_index.device)
        lanes = []
        for start in _LANES:
            state = _absorb(start, prefix)  # a Python int: the same for every number
            state = _absorb(_mix32(lo ^ state), (hi,))[:, None]  # per example, (B, 1)
            lanes.append(_mix32(positions ^ state))  # per position, (B, positions)
        bits = (lanes[0] << 21) | (lanes[1] >> 11)  # 53 bits
        return (bits.to(torch.float64) * 2.0**-53).reshape(len(self.example_index), *shape)

    def normal(self, shape: Sequence[int] = ()) -> torch.Tensor:
        """``(B, *shape)`` float64 standard normals (Box-Muller of two keyed uniforms)."""
        radius = torch.sqrt(-2.0 * torch.log1p(-self.uniform(shape, channel=0)))  # 1 - u in (0, 1]
        return radius * torch.cos(2.0 * math.pi * self.uniform(shape, channel=1))

    def __repr__(self) -> str:
        return f"TargetDraws(seed={self.seed}, stream={self.stream}, examples={self.example_index.numel()})"
