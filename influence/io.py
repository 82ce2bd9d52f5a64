"""Saving and loading fitted estimators: safetensors tensors plus JSON metadata, atomically.

File format (one ``.safetensors`` file, format version :data:`FORMAT_VERSION`):

- tensors: the curvature's fitted state (``curvature/<name>``, see
  :meth:`Curvature._state_tensors`);
- header metadata key ``"influence"``: a JSON document with the format version, the library
  version, the kind of file, the curvature's class and constructor parameters, the task's
  class and parameters (or its repr), the estimator's parameters, the parameter layout, a
  fingerprint of the model (every parameter's name, shape and value statistics) and a
  SHA-256 checksum of every tensor's bytes.

Writes go to a temporary file in the target directory that is renamed over the target, so a
crash never leaves a half-written file under the final name. Reading checks the header,
the file size and every checksum: a truncated or corrupted file raises
:class:`CorruptedFileError`; a file written by a newer format version is refused with
:class:`FormatVersionError`; loading against another model raises :class:`ModelMismatchError`
naming the parameters that differ.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import struct
import tempfile
from typing import Any, Callable

import torch
from torch import nn

from .exceptions import InfluenceError
from .params import model_fingerprint, model_state

FORMAT_VERSION = 1
_META_KEY = "influence"


class StorageError(InfluenceError, ValueError):
    """A file could not be written or read as an influence file."""


class CorruptedFileError(StorageError):
    """A file is truncated or its contents do not match their checksums."""


class FormatVersionError(StorageError):
    """A file was written by a newer version of the format."""


class ModelMismatchError(InfluenceError, ValueError):
    """A saved estimator was loaded against a model other than the one it was fitted on."""


# --------------------------------------------------------------------------------- raw files
def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], by_path: bool = False) -> None:
    """Writes a temporary file next to ``path`` and renames it to ``path`` once complete.

    ``write`` receives the open binary file, or (``by_path=True``) the temporary path.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "r+b") as f:
            if by_path:
                write(tmp)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _checksum(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    if t.numel():
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy())  # no copy for contiguous CPU tensors
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Writes ``tensors`` and the JSON-able ``meta`` (plus checksums) to ``path`` atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, library_version=_library_version())
    meta["checksums"] = {k: _checksum(v) for k, v in cpu.items()}
    header = {_META_KEY: json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=header), by_path=True)


def _read_header(path: str) -> dict:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptedFileError(f"{path} is truncated ({size} bytes): not a complete influence file.")
        (n,) = struct.unpack("<Q", prefix)
        if 8 + n > size:
            raise CorruptedFileError(
                f"{path} is truncated: its header announces {n} bytes but the file has {size}. "
                "The write was interrupted or the copy is incomplete; save it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CorruptedFileError(f"{path} has a corrupted header: not a safetensors file.") from None
    if 8 + n + end > size:
        raise CorruptedFileError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has "
            f"{size}. The write was interrupted or the copy is incomplete; save it again."
        )
    return header


def load_tensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads and verifies a file written by :func:`save_tensors`; returns ``(tensors, meta)``."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such influence file: {path}.")
    header = _read_header(path)
    raw = header.get("__metadata__", {}).get(_META_KEY)
    if raw is None:
        raise StorageError(f"{path} is a safetensors file without influence metadata: it was not written by influence.")
    meta = json.loads(raw)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} uses influence file format version {version} (written by influence "
            f"{meta.get('library_version')}), newer than this version's {FORMAT_VERSION}. "
            "Upgrade influence-estimation to read it."
        )
    if meta.get("kind") != kind:
        raise StorageError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}.")
    try:
        tensors = load_file(path)
    except Exception as error:
        raise CorruptedFileError(f"{path} is corrupted: {error}.") from None
    sums = meta.get("checksums", {})
    bad = sorted(k for k in set(sums) | set(tensors) if k not in tensors or sums.get(k) != _checksum(tensors[k]))
    if bad:
        raise CorruptedFileError(
            f"{path} is corrupted: the contents of {bad[:5]} do not match their checksums. "
            "The file was damaged after writing; save it again."
        )
    return tensors, meta


def _library_version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------- values
def encode(value: Any) -> Any:
    """A JSON-able form of constructor parameter values (dtypes, tuples, nested objects)."""
    from ._params_base import ParamsMixin

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: encode(v) for k, v in value.items()}}
    if isinstance(value, ParamsMixin):
        return {"__object__": describe(value)}
    raise StorageError(
        f"Cannot store a value of type {type(value).__name__} ({value!r}) in the metadata."
    )


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
        if "__float__" in value:
            return float(value["__float__"])
        if "__dict__" in value:
            return {k: decode(v) for k, v in value["__dict__"].items()}
        if "__object__" in value:
            return rebuild(value["__object__"])
    return value


def _init_names(cls: type) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _rebuildable(obj: Any) -> bool:
    return all(n in vars(obj) for n in _init_names(type(obj)))


def _params_from_repr(obj: Any) -> dict[str, Any] | None:
    """``Name(a=1, b='x')`` → ``{"a": 1, "b": "x"}`` when the repr is literal keywords."""
    import ast

    try:
        node = ast.parse(repr(obj), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == type(obj).__name__ and not node.args):
            return None
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    except (SyntaxError, ValueError):
        return None


def describe(obj: Any) -> dict[str, Any]:
    """Class path, repr and, when they can be recovered, the constructor parameters (from
    attributes named like the ``__init__`` arguments, or from a repr of literal keywords)."""
    cls = type(obj)
    out: dict[str, Any] = {"class": f"{cls.__module__}:{cls.__qualname__}", "repr": repr(obj)}
    try:
        if _rebuildable(obj):
            out["params"] = {n: encode(vars(obj)[n]) for n in _init_names(cls)}
        elif (params := _params_from_repr(obj)) is not None:
            out["params"] = {k: encode(v) for k, v in params.items()}
    except StorageError:
        pass
    return out


def rebuild(desc: dict[str, Any]) -> Any:
    """Rebuilds an object from :func:`describe`'s output."""
    module, _, qualname = desc["class"].partition(":")
    if "params" not in desc:
        raise StorageError(f"Cannot rebuild {desc['repr']}: its constructor arguments were not stored.")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise StorageError(f"Cannot rebuild {desc['repr']}: class {desc['class']} is not importable.") from None
    return obj(**{k: decode(v) for k, v in desc["params"].items()})


# --------------------------------------------------------------------------------- models
def compare_fingerprints(saved: dict, current: dict, what: str) -> None:
    """Raises :class:`ModelMismatchError` naming missing, extra, reshaped or changed tensors."""
    problems = []
    missing = [n for n in saved if n not in current]
    extra = [n for n in current if n not in saved]
    if missing:
        problems.append(f"missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected parameters {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    shapes = [f"{n}: saved {saved[n]['shape']}, model {current[n]['shape']}" for n in saved if n in current and saved[n]["shape"] != current[n]["shape"]]
    if shapes:
        problems.append("different shapes (" + "; ".join(shapes[:5]) + ")")
    changed = []
    for n in saved:
        if n in current and saved[n]["shape"] == current[n]["shape"]:
            a, b = saved[n]["stats"], current[n]["stats"]
            scale = math.sqrt(abs(a[1]) * max(1, math.prod(saved[n]["shape"]))) + 1e-30
            if any(abs(x - y) > 1e-6 * (abs(x) + abs(y)) + 1e-9 * scale for x, y in zip(a, b)):
                changed.append(n)
    if changed:
        problems.append(f"different values in {changed[:5]}{' ...' if len(changed) > 5 else ''}")
    if problems:
        raise ModelMismatchError(
            f"{what} was fitted on another model: " + "; ".join(problems) + ". Load it with the "
            "model (architecture and weights) it was fitted on, or fit a new estimator."
        )


# --------------------------------------------------------------------------------- estimators
def save_estimator(est, path: str | os.PathLike) -> None:
    """Implements :meth:`InfluenceEstimator.save`."""
    from ._params_base import check_is_fitted

    check_is_fitted(est, "curvature_", "save()")
    est._check_model("save()")
    cur = est.curvature_
    tensors = {f"curvature/{k}": v for k, v in cur._state_tensors().items()}
    others = {k: v for k, v in est.get_params(deep=False).items() if k not in ("curvature", "task", "params")}
    try:
        params = encode(est.params)
    except StorageError:
        params = None  # a ParameterLayout: the layout below is the selection
    meta = {
        "kind": "estimator",
        "estimator": {"class": f"{type(est).__module__}:{type(est).__qualname__}",
                      "params": {k: encode(v) for k, v in others.items()}, "params_spec": params},
        "curvature": describe(cur),
        "curvature_state": cur._state_metadata(),
        "task": describe(est.task_),
        "layout": est.layout_.to_dict(),
        "num_train": est.num_train_,
        "model": model_fingerprint(est.model_),
    }
    save_tensors(path, tensors, meta)


def load_estimator(cls, path: str | os.PathLike, model: nn.Module, task=None):
    """Implements :meth:`InfluenceEstimator.load`."""
    from .params import ParameterLayout

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the estimator was fitted on; got {type(model).__name__}.")
    tensors, meta = load_tensors(path, "estimator")
    compare_fingerprints(meta["model"], model_fingerprint(model), f"The estimator saved in {os.fspath(path)}")
    layout = ParameterLayout.from_dict(meta["layout"])
    if task is None:
        try:
            task = rebuild(meta["task"])
        except StorageError as error:
            raise StorageError(f"{error} Pass task=... to load().") from None
    curvature = rebuild(meta["curvature"])
    spec = meta["estimator"]["params_spec"]
    params = {k: decode(v) for k, v in meta["estimator"]["params"].items() if k in cls._param_names()}
    est = cls(curvature=curvature, task=task, params=layout if spec is None else decode(spec), **params)
    device = next(iter(layout.tensors(model).values())).device
    state = {k.partition("/")[2]: v.to(device) for k, v in tensors.items() if k.startswith("curvature/")}
    fitted = rebuild(meta["curvature"])
    fitted._load_state(state, meta["curvature_state"], layout, model)
    est.curvature_ = fitted
    est.task_ = task
    est.layout_ = layout
    est.model_ = model
    est.train_loader_ = None
    est.num_train_ = meta["num_train"]
    est.fingerprint_ = model_state(model)
    est.timings_ = {}
    after_load = getattr(est, "_after_load", None)
    if after_load is not None:  # derived fitted state an estimator rebuilds from the above
        after_load()
    return est


__all__ = [
    "FORMAT_VERSION",
    "CorruptedFileError",
    "FormatVersionError",
    "ModelMismatchError",
    "StorageError",
    "atomic_write",
    "compare_fingerprints",
    "load_tensors",
    "model_fingerprint",
    "save_tensors",
    "load_estimator",
    "save_estimator",
]
