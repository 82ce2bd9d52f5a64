"""scikit-learn style parameter handling: ``get_params``, ``set_params`` and ``clone``.

``__init__`` of every estimator and curvature only stores its keyword arguments under the same
names; learned state ends in ``_``. ``clone`` builds a fresh unfitted copy from ``get_params``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any


class ParamsMixin:
    """Implements the scikit-learn estimator parameter contract."""

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [
            name
            for name, p in signature.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Returns the constructor parameters; with ``deep``, nested ones as ``outer__inner``."""
        params = {}
        for name in self._param_names():
            value = getattr(self, name)
            params[name] = value
            if deep and isinstance(value, ParamsMixin):
                for sub_name, sub_value in value.get_params(deep=True).items():
                    params[f"{name}__{sub_name}"] = sub_value
        return params

    def set_params(self, **params: Any):
        """Sets constructor parameters (``outer__inner`` reaches nested objects); returns self."""
        valid = self._param_names()
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in valid:
                raise ValueError(
                    f"Invalid parameter {name!r} for {type(self).__name__}. "
                    f"Valid parameters: {tuple(valid)}."
                )
            if sub:
                getattr(self, name).set_params(**{sub: value})
            else:
                setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params(deep=False).items())
        return f"{type(self).__name__}({args})"


def clone(obj: Any) -> Any:
    """Returns an unfitted copy with the same constructor parameters (deep-copied).

    As ``sklearn.base.clone``: nested estimators (a curvature inside an estimator) are cloned
    too, fitted state (attributes ending in ``_``) is not copied.

    Examples:
        >>> import torch, influence
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> est = influence.InfluenceEstimator(influence.KFAC(damping=0.1)).fit(model, data)
        >>> fresh = influence.clone(est)
        >>> fresh.curvature.damping, fresh.curvature is est.curvature, hasattr(fresh, "curvature_")
        (0.1, False, False)
    """
    if isinstance(obj, ParamsMixin):
        params = {
            k: clone(v) if isinstance(v, ParamsMixin) else copy.deepcopy(v)
            for k, v in obj.get_params(deep=False).items()
        }
        return type(obj)(**params)
    return copy.deepcopy(obj)


def check_is_fitted(obj: Any, attribute: str, method: str = "this method") -> None:
    """Raises :class:`NotFittedError` when ``attribute`` (ending in ``_``) is not set."""
    from .exceptions import NotFittedError

    if getattr(obj, attribute, None) is None:
        raise NotFittedError(
            f"This {type(obj).__name__} is not fitted yet: call fit(...) before {method}."
        )
