"""The classes a saved file may name, and the plain-data encoding of constructor arguments.

A saved estimator names its curvature's and its task's class and stores their constructor
arguments, so that :meth:`InfluenceEstimator.load` can rebuild them. The file is untrusted
input, so a name is resolved only through an allow-list, by exact ``"module:QualName"``
string, and nothing named in a file is ever imported: an unknown name raises
:class:`StorageError` before any code runs. The allow-list holds

- the library's own classes: :data:`~influence.CURVATURES`, the ready-made tasks,
  :data:`~influence.BASELINES` and :class:`~influence.ScoringConfig`;
- the classes registered with :func:`register_class` (the analogue of
  ``torch.serialization.add_safe_globals`` for ``torch.load(weights_only=True)``);
- for one call, the class of an instance passed to ``load`` (``curvature=``).

Constructor arguments are decoded only into plain data: ``None``, booleans, numbers
(``{"__float__": "inf"}`` for non-finite ones), strings, lists, string-keyed dicts
(``{"__dict__": {...}}``), torch dtypes (``{"__dtype__": "float64"}``, looked up in a table of
the real dtypes) and nested objects (``{"__object__": ...}``, e.g. a CG preconditioner or a
:class:`ScoringConfig`), which go through the same allow-list. Never a callable.
"""

from __future__ import annotations

import ast
import inspect
import math
from typing import Any

import torch

from ._atomic import StorageError

_USER: dict[str, type] = {}
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def class_name(cls: type) -> str:
    """The name a file stores for ``cls``: ``"module:QualName"``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def register_class(cls: type) -> type:
    """Allows files to name ``cls``, so that :meth:`InfluenceEstimator.load` rebuilds it.

    Register your own :class:`~influence.Task` or :class:`~influence.Curvature` subclasses
    (or the classes nested in their arguments) before loading an estimator saved with them.
    A registered class's constructor is called with the plain-data arguments stored in the
    file, so register only classes whose constructor is safe to call with any such values.
    Returns ``cls``, so it also works as a class decorator.

    Examples:
        >>> import influence
        >>> @influence.register_class
        ... class DoubledTask(influence.ClassificationTask):
        ...     pass
        >>> influence.io.allowed_class(influence.io.class_name(DoubledTask)) is DoubledTask
        True
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_class takes a class, e.g. register_class(MyTask); got {cls!r}.")
    _USER[class_name(cls)] = cls
    return cls


def _builtin() -> dict[str, type]:
    from .baselines import BASELINES
    from .curvature import CURVATURES
    from .scoring import ScoringConfig
    from .tasks import ClassificationTask, LanguageModelingTask, RegressionTask

    classes = (*CURVATURES, *BASELINES, ScoringConfig, ClassificationTask, RegressionTask, LanguageModelingTask)
    return {class_name(c): c for c in classes}


def allowed_class(name: str, extra: dict[str, type] | None = None) -> type | None:
    """The allowed class of that exact name, or ``None``. Imports nothing."""
    if not isinstance(name, str):
        return None
    return (extra or {}).get(name) or _USER.get(name) or _builtin().get(name)


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
    raise StorageError(f"Cannot store a value of type {type(value).__name__} ({value!r}) in the metadata.")


def decode(value: Any, extra: dict[str, type] | None = None) -> Any:
    """Inverse of :func:`encode`; nested objects only of allowed classes (module docstring)."""
    if isinstance(value, list):
        return [decode(v, extra) for v in value]
    if not isinstance(value, dict):
        return value
    if "__dtype__" in value:
        if value["__dtype__"] not in _DTYPES:
            raise StorageError(f"The metadata names an unknown torch dtype {value['__dtype__']!r}.")
        return _DTYPES[value["__dtype__"]]
    if "__float__" in value:
        text = value["__float__"]
        if text not in ("inf", "-inf", "nan"):
            raise StorageError(f"The metadata holds {text!r} where a non-finite float (inf, -inf, nan) belongs.")
        return float(text)
    if "__dict__" in value:
        if not isinstance(value["__dict__"], dict):
            raise StorageError("The metadata holds a malformed dict value.")
        return {k: decode(v, extra) for k, v in value["__dict__"].items()}
    if "__object__" in value:
        return rebuild(value["__object__"], extra)
    return {k: decode(v, extra) for k, v in value.items()}


def _init_names(cls: type) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _params_from_repr(obj: Any) -> dict[str, Any] | None:
    """``Name(a=1, b='x')`` → ``{"a": 1, "b": "x"}`` when the repr is literal keywords."""
    try:
        node = ast.parse(repr(obj), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == type(obj).__name__ and not node.args):
            return None
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    except (SyntaxError, ValueError):
        return None


def describe(obj: Any) -> dict[str, Any]:
    """Class name, repr and, when they can be recovered, the constructor parameters (from
    attributes named like the ``__init__`` arguments, or from a repr of literal keywords)."""
    cls = type(obj)
    out: dict[str, Any] = {"class": class_name(cls), "repr": repr(obj)}
    names = _init_names(cls)
    try:
        if all(n in vars(obj) for n in names):
            out["params"] = {n: encode(vars(obj)[n]) for n in names}
        elif (params := _params_from_repr(obj)) is not None:
            out["params"] = {k: encode(v) for k, v in params.items()}
    except StorageError:
        pass
    return out


def rebuild(desc: Any, extra: dict[str, type] | None = None) -> Any:
    """Rebuilds an object from :func:`describe`'s output, if its class is allowed.

    Raises:
        StorageError: the class is not allowed (before anything is imported or called), its
            arguments were not stored, or it does not take them.
    """
    if not isinstance(desc, dict) or not isinstance(desc.get("class"), str):
        raise StorageError("The metadata holds a malformed object description.")
    name, shown = desc["class"], str(desc.get("repr", desc["class"]))[:200]
    cls = allowed_class(name, extra)
    if cls is None:
        short = name.rpartition(":")[2].rpartition(".")[2] or "MyClass"
        raise StorageError(
            f"Cannot rebuild {shown}: the file names class {name!r}, which is neither one of "
            f"influence's classes nor registered. Files never choose what code runs: if you "
            f"trust that class, call influence.register_class({short}) before loading."
        )
    params = desc.get("params")
    if params is None:
        raise StorageError(f"Cannot rebuild {shown}: its constructor arguments were not stored.")
    unknown = sorted(set(params) - set(_init_names(cls))) if isinstance(params, dict) else ["<not a dict>"]
    if unknown:
        raise StorageError(f"Cannot rebuild {shown}: {name} takes no arguments {unknown}.")
    arguments = {k: decode(v, extra) for k, v in params.items()}
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise StorageError(f"Cannot rebuild {shown} from the saved arguments: {error}") from None
