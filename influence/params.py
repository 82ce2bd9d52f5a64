"""Which parameters are attributed, and their flat layout.

A :class:`ParameterLayout` fixes an order of named parameters and maps them to one flat vector
of length ``P``: parameter ``names[k]`` occupies ``flat[..., offsets[k]:offsets[k] + numels[k]]``
reshaped to ``shapes[k]``. Every flat gradient in the library (``(n, P)``, batch first) uses it.

Selection (``select_parameters``):

- ``"trainable"`` (default): every parameter with ``requires_grad=True``;
- ``"all"``: every parameter;
- a glob pattern or a list of them, matched against parameter names (``"fc2.weight"``) and
  against their module names (``"fc2"``, ``"*.lora_*"``, ``"layers.3.*"``);
- an existing :class:`ParameterLayout`.

Tied parameters (one tensor under two names) appear once, under their first name.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
from torch import nn

ParamSpec = Union[str, Sequence[str], "ParameterLayout"]


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of the attributed parameters in one flat vector.

    Examples:
        >>> import torch
        >>> layout = select_parameters(torch.nn.Linear(3, 2))
        >>> layout.names, layout.num_params
        (('weight', 'bias'), 8)
        >>> flat = torch.arange(16.).reshape(2, 8)
        >>> layout.unflatten(flat)["bias"].shape
        torch.Size([2, 2])
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.numels:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def slices(self) -> dict[str, slice]:
        """Maps each parameter name to its slice of the flat vector."""
        return {
            name: slice(off, off + n) for name, off, n in zip(self.names, self.offsets, self.numels)
        }

    def module_blocks(self) -> dict[str, slice]:
        """Groups consecutive parameters of one module (``"layer.weight"``, ``"layer.bias"``).

        Returns a mapping from module name to its contiguous slice of the flat vector; used by
        per-layer (block-diagonal) curvatures.
        """
        blocks: dict[str, slice] = {}
        for name, sl in self.slices().items():
            module = module_name(name)
            if module in blocks and blocks[module].stop == sl.start:
                blocks[module] = slice(blocks[module].start, sl.stop)
            else:
                key = module if module not in blocks else name
                blocks[key] = sl
        return blocks

    def flatten(self, tensors: Mapping[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenates per-parameter tensors into ``(*batch, P)``.

        Args:
            tensors: one tensor per name, each of shape ``(*batch, *shape)``.
            batch_dims: number of leading batch dimensions.
        """
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"flatten: missing tensors for parameters {missing}.")
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Splits ``(*batch, P)`` into a dict of ``(*batch, *shape)`` views."""
        if flat.shape[-1] != self.num_params:
            raise ValueError(
                f"unflatten: expected a last dimension of {self.num_params} "
                f"(the layout's parameter count), got shape {tuple(flat.shape)}."
            )
        batch = flat.shape[:-1]
        return {
            name: flat[..., sl].reshape(*batch, *shape)
            for (name, sl), shape in zip(self.slices().items(), self.shapes)
        }

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's current parameter tensors for this layout, by name."""
        named = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in self.names if n not in named]
        if missing:
            raise KeyError(
                f"The model has no parameters named {missing}; the layout was built for "
                f"another model. Build the layout from this model."
            )
        return {n: named[n] for n in self.names}

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ParameterLayout":
        return cls(tuple(data["names"]), tuple(torch.Size(s) for s in data["shapes"]))


def module_name(param_name: str) -> str:
    """``"encoder.fc.weight" -> "encoder.fc"``; top-level parameters belong to ``""``."""
    return param_name.rpartition(".")[0]


def select_parameters(model: nn.Module, params: ParamSpec = "trainable") -> ParameterLayout:
    """Builds the :class:`ParameterLayout` of the parameters to attribute.

    Raises:
        ValueError: when nothing is selected, or a pattern matches no parameter (the message
            lists the available names).
    """
    if isinstance(params, ParameterLayout):
        params.tensors(model)  # validates the names
        return params
    named = list(model.named_parameters())  # remove_duplicate=True: tied weights once
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no parameters: there is nothing to attribute."
        )
    if isinstance(params, str) and params == "trainable":
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (all have "
                "requires_grad=False). Unfreeze the parameters to attribute, or pass "
                "params='all' or name them with patterns, e.g. params=['fc2']."
            )
    elif isinstance(params, str) and params == "all":
        chosen = named
    else:
        patterns = [params] if isinstance(params, str) else params
        if (
            not isinstance(patterns, (list, tuple))
            or not patterns
            or not all(isinstance(p, str) for p in patterns)
        ):
            raise TypeError(
                "params must be 'trainable', 'all', a glob pattern, a list of patterns or a "
                f"ParameterLayout; got {params!r}."
            )
        unmatched = [pat for pat in patterns if not any(_matches(n, pat) for n, _ in named)]
        if unmatched:
            available = ", ".join(n for n, _ in named)
            raise ValueError(
                f"Parameter pattern(s) {unmatched} matched no parameter of "
                f"{type(model).__name__}. Patterns are globs matched against parameter names "
                f"and module names. Available parameters: {available}."
            )
        chosen = [(n, p) for n, p in named if any(_matches(n, pat) for pat in patterns)]
    return ParameterLayout(tuple(n for n, _ in chosen), tuple(p.shape for _, p in chosen))


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module_name(name), pattern)


def parameter_fingerprint(model: nn.Module, layout: ParameterLayout) -> str:
    """A cheap digest of the attributed parameters' values (one pass, no copies kept).

    Per parameter: its shape, the float64 sum, the sum of squares and an index-weighted sum
    (which also catches permutations). Used to detect a model changed after ``fit``.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in layout.tensors(model).items():
            flat = t.detach().reshape(-1).double()
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
            weights = torch.remainder(weights * 0.6180339887, 1.0)
            stats = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()])
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(stats.cpu().numpy().tobytes())
    return h.hexdigest()
