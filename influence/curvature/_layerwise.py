"""Per-layer pieces shared by ``DataInf`` and ``LiSSA(variant="paper")``.

Both work on the per-example training gradients of the fit set, split into blocks of the flat
parameter vector, and accept the layer-wise damping rule of DataInf's code (used by Li et al.
2024): ``λ_l = 0.1 · mean_{j, k} G_l[j, k]²``, the mean squared per-example gradient entry of
block ``l``, written ``damping="datainf"``.
"""

from __future__ import annotations

from typing import Any

import torch

from .._loader import iterate_batches
from ..gradients.functional import per_sample_grads
from ..params import ParameterLayout
from ._base import check_damping

DATAINF = "datainf"
BLOCKS = ("module", "parameter")


def block_slices(layout: ParameterLayout, blocks: str, owner: str) -> list[slice]:
    """``"module"``: one block per module (``layout.module_blocks()``); ``"parameter"``: one per
    parameter tensor (as DataInf's code, which treats ``lora_A`` and ``lora_B`` separately)."""
    if blocks not in BLOCKS:
        raise ValueError(f"{owner}: invalid blocks {blocks!r}. Supported: {BLOCKS}.")
    table = layout.module_blocks() if blocks == "module" else layout.slices()
    return list(table.values())


def training_gradients(model, task, loader, layout, chunk_size=None, what: str = "train") -> torch.Tensor:
    """All per-example training gradients ``(N, P)`` of the loader, in the parameters' dtype.

    Raises:
        NonFiniteGradientError: naming the training examples (``what`` examples, in loader
            order) with NaN/inf gradients, at fit time (later they would poison every solve and
            be blamed on the queries).
    """
    from .._guards import check_finite

    blocks, offset = [], 0
    for batch in iterate_batches(loader, "loader"):
        G = per_sample_grads(model, task, batch, layout, chunk_size)
        check_finite(G, offset, what)
        offset += G.shape[0]
        blocks.append(G)
    return torch.cat(blocks)


def datainf_damping(G: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    """Per-coordinate damping ``(P,)`` of the DataInf rule: ``0.1 · mean(G_l²)`` on block ``l``."""
    out = torch.empty(G.shape[1], dtype=torch.float64, device=G.device)
    for sl in slices:
        out[sl] = 0.1 * G[:, sl].double().pow(2).mean()
    return out


class LayerDampingMixin:
    """Lets ``damping`` be a float or ``"datainf"`` (needs ``datainf_damping_``, ``(P,)``)."""

    def _damping(self, damping: Any) -> Any:
        value = self.damping if damping is None else damping
        if isinstance(value, str):
            if value != DATAINF:
                raise ValueError(
                    f"{type(self).__name__}: damping must be a float >= 0 or 'datainf' (the "
                    f"layer-wise rule 0.1 × mean squared gradient entry); got {value!r}."
                )
            return value
        return check_damping(value, type(self).__name__)

    def _coordinate_damping(self, damping: Any) -> torch.Tensor | float:
        """A float, or the ``(P,)`` vector of per-coordinate damping for ``"datainf"``."""
        return self.datainf_damping_ if damping == DATAINF else damping

    def _exact_matmat(self, V: torch.Tensor, damping: Any) -> torch.Tensor:
        return super()._exact_matmat(V, self._coordinate_damping(damping))
