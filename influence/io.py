"""Saving and loading fitted estimators: safetensors tensors plus JSON metadata, atomically.

File format (one ``.safetensors`` file, format version :data:`FORMAT_VERSION`):

- tensors: the curvature's fitted state (``curvature/<name>``, see
  :meth:`Curvature._state_tensors`);
- header metadata key ``"influence"``: a JSON document with the format version, the library
  version, the kind of file, the curvature's class and constructor parameters, the task's
  class and parameters (or its repr), the estimator's parameters, the parameter layout, a
  fingerprint of the model (every parameter's name, shape and value statistics), a SHA-256
  of every tensor (its dtype, shape and bytes) and ``"checksum"``: the SHA-256 of the
  canonical JSON of all the rest (``json.dumps(meta, sort_keys=True, separators=(",", ":"))``
  without the ``"checksum"`` key). That one digest thus covers the metadata and, through their
  digests, every tensor.

Writes are atomic and durable (:mod:`influence._atomic`: a locked temporary file, fsync,
rename, fsync of the directory; stale temporary files of killed writers are swept) and refuse
targets that are not regular files (directories, devices, FIFOs, symbolic links). Reading
checks the header, the file size and the checksums: a truncated, damaged or edited file raises
:class:`CorruptedFileError`; a file written by a newer format version is refused with
:class:`FormatVersionError`; loading against another model raises :class:`ModelMismatchError`
naming the parameters that differ. Classes named in a file are resolved only through an
allow-list (:mod:`influence._registry`, :func:`register_class`): loading never imports or calls
a name read from a file. Version 1 files (per-tensor checksums only) still load, with a
warning that their metadata is not integrity-checked.

The checksum detects damage and edits by tools that do not know the format; it is not a
signature: whoever can rewrite the file can recompute it. See ``docs/files_and_safety.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from typing import Any

import torch
from torch import nn

from ._atomic import StorageError, atomic_write, check_source
from ._registry import allowed_class, class_name, decode, describe, encode, rebuild, register_class
from .exceptions import InfluenceError
from .params import model_fingerprint, model_state

FORMAT_VERSION = 2
_META_KEY = "influence"


class CorruptedFileError(StorageError):
    """A file is truncated, or its contents do not match their checksums.

    Examples:
        >>> import os, tempfile, torch, influence
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> path = os.path.join(tempfile.mkdtemp(), "estimator.safetensors")
        >>> influence.InfluenceEstimator(influence.Exact(damping=0.1)).fit(model, data).save(path)
        >>> with open(path, "r+b") as f:  # flip the file's last byte (a tensor's)
        ...     _ = f.seek(-1, os.SEEK_END)
        ...     last = f.read(1)
        ...     _ = f.seek(-1, os.SEEK_END)
        ...     _ = f.write(bytes([last[0] ^ 0xFF]))
        >>> influence.InfluenceEstimator.load(path, model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.io.CorruptedFileError: ...
    """


class FormatVersionError(StorageError):
    """A file was written by a newer version of the format.

    Examples:
        A file that claims format version 99:

        >>> import json, os, tempfile, torch, influence
        >>> from safetensors.torch import save_file
        >>> path = os.path.join(tempfile.mkdtemp(), "future.safetensors")
        >>> meta = {"format_version": 99, "library_version": "9.0.0"}
        >>> save_file({"x": torch.zeros(1)}, path, metadata={"influence": json.dumps(meta)})
        >>> influence.InfluenceEstimator.load(path, torch.nn.Linear(3, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.io.FormatVersionError: ... uses influence file format version 99 (written by influence 9.0.0), newer than this version's ... Upgrade influence-estimation to read it.
    """


class ModelMismatchError(InfluenceError, ValueError):
    """A saved estimator was loaded against a model other than the one it was fitted on.

    Examples:
        >>> import os, tempfile, torch, influence
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> path = os.path.join(tempfile.mkdtemp(), "estimator.safetensors")
        >>> influence.InfluenceEstimator(influence.Identity()).fit(model, data).save(path)
        >>> influence.InfluenceEstimator.load(path, torch.nn.Linear(3, 4).double())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.io.ModelMismatchError: The estimator saved in ... was fitted on another model: different shapes (weight: saved [2, 3], model [4, 3]; ...
    """


# --------------------------------------------------------------------------------- raw files
def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _tensor_checksum(t: torch.Tensor, version: int = FORMAT_VERSION) -> str:
    """SHA-256 of the dtype, shape (since version 2) and bytes of a CPU tensor."""
    h = hashlib.sha256()
    if version >= 2:
        h.update(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    h.update(_bytes(t.contiguous()))
    return h.hexdigest()


def metadata_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its ``"checksum"`` key."""
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
}


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Writes ``tensors`` and the JSON-able ``meta`` (plus checksums) to ``path`` atomically.

    The safetensors format (8-byte little-endian header size, a JSON header padded with spaces
    to a multiple of 8 bytes, then the tensors' bytes back to back) is streamed one tensor at
    a time: a CPU state is written without any copy, a GPU state one tensor at a time.
    """
    unsupported = {k: t.dtype for k, t in tensors.items() if t.dtype not in _SAFETENSORS_DTYPES}
    if unsupported:
        raise StorageError(f"Cannot save tensors of dtypes {unsupported}: supported are {sorted(map(str, _SAFETENSORS_DTYPES))}.")
    meta = dict(meta, format_version=FORMAT_VERSION, library_version=_library_version())
    meta["checksums"] = {k: _tensor_checksum(_cpu(v)) for k, v in tensors.items()}
    meta["checksum"] = metadata_checksum(meta)
    header: dict[str, Any] = {"__metadata__": {_META_KEY: json.dumps(meta)}}
    offset = 0
    for k, t in tensors.items():
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(_bytes(_cpu(t)))

    atomic_write(path, write)


def _read_header(path: str) -> dict:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptedFileError(f"{path} is truncated ({size} bytes): not a complete influence file.")
        (n,) = struct.unpack("<Q", prefix)
        if 8 + n > size:
            raise CorruptedFileError(
                f"{path} is truncated: its header announces {n} bytes after the 8-byte length prefix, "
                f"{8 + n} in all, but the file has {size}. "
                "The write was interrupted or the copy is incomplete; save it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CorruptedFileError(f"{path} has a corrupted header: not a safetensors file.") from None
    if 8 + n + end > size:
        raise CorruptedFileError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has "
            f"{size}. The write was interrupted or the copy is incomplete; save it again."
        )
    return header


def _read_metadata(path: str, header: dict) -> dict[str, Any]:
    """The verified influence metadata of a safetensors header (see the module docstring)."""
    metadata = header.get("__metadata__")
    raw = metadata.get(_META_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        raise StorageError(f"{path} is a safetensors file without influence metadata: it was not written by influence.")
    try:
        meta = json.loads(raw)
    except ValueError as error:
        raise CorruptedFileError(f"{path} has corrupted metadata (not valid JSON: {error}); save it again.") from None
    if not isinstance(meta, dict):
        raise CorruptedFileError(f"{path} has corrupted metadata (a JSON {type(meta).__name__}, not an object); save it again.")
    version = meta.get("format_version")
    if type(version) is not int or version < 1:  # noqa: E721 (True is not a version)
        raise CorruptedFileError(
            f"{path} has corrupted metadata: its format_version is {version!r}, not a positive "
            "integer. Save it again."
        )
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} uses influence file format version {version} (written by influence "
            f"{meta.get('library_version')}), newer than this version's {FORMAT_VERSION}. "
            "Upgrade influence-estimation to read it."
        )
    if version == 1:
        warnings.warn(
            f"{path} uses influence file format version 1, whose metadata (curvature, damping, "
            "task, number of training examples) is not covered by a checksum: edits or damage "
            "there go undetected. Load it once and save it again to upgrade it to version "
            f"{FORMAT_VERSION}.",
            UserWarning,
            stacklevel=5,  # the caller of InfluenceEstimator.load
        )
    elif meta.get("checksum") != metadata_checksum(meta):
        raise CorruptedFileError(
            f"{path} is corrupted: its metadata does not match its checksum (it was damaged or "
            "edited after writing). Save it again from the fitted estimator, or fit again."
        )
    if not isinstance(meta.get("checksums", {}), dict):
        raise CorruptedFileError(f"{path} has corrupted metadata: its tensor checksums are not a mapping.")
    return meta


def load_tensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads and verifies a file written by :func:`save_tensors`; returns ``(tensors, meta)``."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    check_source(path)
    meta = _read_metadata(path, _read_header(path))
    if meta.get("kind") != kind:
        raise StorageError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}.")
    try:
        tensors = load_file(path)
    except Exception as error:
        raise CorruptedFileError(f"{path} is corrupted: {error}.") from None
    sums, version = meta.get("checksums", {}), meta["format_version"]
    bad = sorted(k for k in set(sums) | set(tensors) if k not in tensors or sums.get(k) != _tensor_checksum(tensors[k], version))
    if bad:
        raise CorruptedFileError(
            f"{path} is corrupted: the contents of {bad[:5]} do not match their checksums. "
            "The file was damaged after writing; save it again."
        )
    return tensors, meta


def _library_version() -> str:
    from . import __version__

    return __version__


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
        "estimator": {"class": class_name(type(est)),
                      "params": {k: encode(v) for k, v in others.items()}, "params_spec": params},
        "curvature": describe(cur),
        "curvature_state": cur._state_metadata(),
        "task": describe(est.task_),
        "layout": est.layout_.to_dict(),
        "num_train": est.num_train_,
        "model": model_fingerprint(est.model_),
    }
    save_tensors(path, tensors, meta)


def load_estimator(cls, path: str | os.PathLike, model: nn.Module, task=None, curvature=None):
    """Implements :meth:`InfluenceEstimator.load`."""
    from ._params_base import clone
    from .curvature import Curvature
    from .params import ParameterLayout

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the estimator was fitted on; got {type(model).__name__}.")
    if curvature is not None and not isinstance(curvature, Curvature):
        raise TypeError(f"curvature must be an instance of the saved curvature's class (e.g. MyCurvature(...)); got {curvature!r}.")
    path = os.fspath(path)
    tensors, meta = load_tensors(path, "estimator")
    try:
        compare_fingerprints(meta["model"], model_fingerprint(model), f"The estimator saved in {path}")
        layout = ParameterLayout.from_dict(meta["layout"])
        if task is None:
            try:
                task = rebuild(meta["task"])
            except StorageError as error:
                raise StorageError(f"{error} Pass task=... to load() to use your own instance.") from None
        fitted = _saved_curvature(meta["curvature"], curvature, path)
        spec = meta["estimator"]["params_spec"]
        params = {k: decode(v) for k, v in meta["estimator"]["params"].items() if k in cls._param_names()}
        est = cls(curvature=clone(fitted), task=task, params=layout if spec is None else decode(spec), **params)
        num_train, state_meta = meta["num_train"], meta["curvature_state"]
        if type(num_train) is not int or num_train < 0 or not isinstance(state_meta, dict):  # noqa: E721
            raise CorruptedFileError(f"{path} has malformed metadata: num_train {num_train!r} or curvature_state {state_meta!r:.80}.")
    except InfluenceError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise CorruptedFileError(f"{path} has malformed metadata ({type(error).__name__}: {error}); save it again.") from None
    device = next(iter(layout.tensors(model).values())).device
    state = {k.partition("/")[2]: v.to(device) for k, v in tensors.items() if k.startswith("curvature/")}
    try:
        fitted._load_state(state, state_meta, layout, model)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
        raise CorruptedFileError(
            f"The curvature state saved in {path} does not fit {type(fitted).__name__}, the class "
            f"its metadata names ({type(error).__name__}: {error}). The file was edited, or "
            "written by an incompatible version: fit and save the estimator again."
        ) from None
    est.curvature_ = fitted
    est.task_ = task
    est.layout_ = layout
    est.model_ = model
    est.train_loader_ = None
    est.num_train_ = num_train
    est.fingerprint_ = model_state(model)
    est.timings_ = {}
    after_load = getattr(est, "_after_load", None)
    if after_load is not None:  # derived fitted state an estimator rebuilds from the above
        after_load()
    return est


def _saved_curvature(desc: Any, given, path: str):
    """The saved curvature, unfitted; ``given`` (an instance passed to ``load``) allows its
    class and must equal it."""
    if given is None:
        try:
            return rebuild(desc)
        except StorageError as error:
            raise StorageError(f"{error} Pass curvature=<an instance with the saved parameters> to load() to use your own class.") from None
    name = class_name(type(given))
    if not isinstance(desc, dict) or desc.get("class") != name:
        saved = desc.get("class") if isinstance(desc, dict) else None
        raise StorageError(f"{path} holds a {saved} curvature, but curvature= is a {name}.")
    rebuilt = rebuild(desc, {name: type(given)})
    if repr(rebuilt) != repr(given):
        raise StorageError(
            f"curvature={given!r} differs from the saved {rebuilt!r}: the fitted state belongs "
            "to the saved parameters. Pass an instance with those."
        )
    return rebuilt


__all__ = [
    "FORMAT_VERSION",
    "CorruptedFileError",
    "FormatVersionError",
    "ModelMismatchError",
    "StorageError",
    "allowed_class",
    "atomic_write",
    "class_name",
    "compare_fingerprints",
    "load_tensors",
    "metadata_checksum",
    "model_fingerprint",
    "register_class",
    "save_tensors",
    "load_estimator",
    "save_estimator",
]
