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
from typing import Any, Mapping, Sequence, Union

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

    Args:
        model: the model.
        params: ``"trainable"`` (parameters with ``requires_grad``), ``"all"``, a glob pattern
            or a list of them matched against parameter and module names (``"*lora_*"``,
            ``"fc2"``), or a :class:`ParameterLayout` (validated and returned).

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> select_parameters(model).num_params
        26
        >>> select_parameters(model, "2").names, select_parameters(model, "*.bias").num_params
        (('2.weight', '2.bias'), 6)

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


_STATS_CHUNK = 1 << 22  # elements converted to float64 at a time


def tensor_stats(t: torch.Tensor) -> list[float]:
    """``[Σ x, Σ x², Σ w_k x_k]`` of a tensor's values in float64, ``w_k = frac(0.618·k)``.

    The index weights make the digest change under permutations. Computed in chunks of
    ``2**22`` elements, so no float64 copy of a whole tensor is made.
    """
    flat = t.detach().reshape(-1)
    total = torch.zeros(3, dtype=torch.float64, device=flat.device)
    with torch.no_grad():
        for start in range(0, flat.numel(), _STATS_CHUNK):
            part = flat[start : start + _STATS_CHUNK].double()
            k = torch.arange(start + 1, start + part.numel() + 1, dtype=torch.float64, device=flat.device)
            weights = torch.remainder(k * 0.6180339887, 1.0)
            total += torch.stack([part.sum(), part.dot(part), part.dot(weights)])
    return total.cpu().tolist()


def parameter_fingerprint(model: nn.Module, layout: ParameterLayout) -> str:
    """A digest of the attributed parameters' names, shapes and :func:`tensor_stats`.

    Keys checkpoints and compares ranks; :func:`model_fingerprint` covers the whole model.
    """
    h = hashlib.sha256()
    for name, t in layout.tensors(model).items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(torch.tensor(tensor_stats(t), dtype=torch.float64).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module, persistent_only: bool = False) -> dict[str, dict[str, Any]]:
    """Per parameter and floating buffer: ``{"shape": [...], "stats": tensor_stats(t)}``.

    ``persistent_only`` leaves out non-persistent buffers (by PyTorch convention caches derived
    from other state, e.g. rotary tables, which a forward may rebuild). One pass over the
    values; ``requires_grad`` and ``train()``/``eval()`` do not enter it.
    """
    named = list(model.named_parameters())
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if not buffer.is_floating_point():
            continue
        if persistent_only and leaf in model.get_submodule(owner)._non_persistent_buffers_set:
            continue
        named.append((name, buffer))
    return {name: {"shape": list(t.shape), "stats": tensor_stats(t)} for name, t in named}


def module_signatures(model: nn.Module) -> dict[str, str]:
    """``{module name: "package.Class(extra_repr)"}`` for every submodule: the architecture,
    including hyperparameters such as an activation's slope or a convolution's stride."""
    return {
        name: f"{type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})"
        for name, m in model.named_modules()
    }


def model_state(model: nn.Module) -> dict[str, dict]:
    """What :meth:`InfluenceEstimator.fit` records to detect later changes (exactly)."""
    return {"tensors": model_fingerprint(model, persistent_only=True), "modules": module_signatures(model)}


def model_changes(before: dict[str, dict], after: dict[str, dict], attributed: Sequence[str]) -> list[str]:
    """What differs between two :func:`model_state` records, in words (empty: nothing)."""
    problems = []
    old, new = before["tensors"], after["tensors"]
    params = set(attributed)

    def listing(names: list[str]) -> str:
        return f"{names[:5]}{' ...' if len(names) > 5 else ''}"

    for label, names in (
        ("missing tensors", [n for n in old if n not in new]),
        ("new tensors", [n for n in new if n not in old]),
        ("reshaped tensors", [n for n in old if n in new and old[n]["shape"] != new[n]["shape"]]),
    ):
        if names:
            problems.append(f"{label} {listing(names)}")
    changed = [n for n in old if n in new and old[n]["shape"] == new[n]["shape"] and old[n]["stats"] != new[n]["stats"]]
    for label, names in (
        ("attributed parameters", [n for n in changed if n in params]),
        ("other parameters and buffers (not attributed, but they shape the gradients)", [n for n in changed if n not in params]),
    ):
        if names:
            problems.append(f"values of {label} {listing(names)}")
    mods_old, mods_new = before["modules"], after["modules"]
    swapped = [f"module {n or '<root>'!r} is now {mods_new[n]} (was {mods_old[n]})" for n in mods_old if n in mods_new and mods_old[n] != mods_new[n]]
    problems += swapped[:3] + (["..."] if len(swapped) > 3 else [])
    for label, names in (("removed modules", [n for n in mods_old if n not in mods_new]), ("added modules", [n for n in mods_new if n not in mods_old])):
        if names:
            problems.append(f"{label} {listing(names)}")
    return problems
