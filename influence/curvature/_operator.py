"""The matrix-free curvature operator shared by ``CG``, ``LiSSA``, ``Arnoldi`` and ``DataInf``.

:class:`CurvatureOperator` applies ``C = (1/N) Σ_j C_j`` (the curvature of the **mean**
training loss, :mod:`._products` for ``C_j``) to the rows of ``V`` (``(n, P)``) without forming
it: one pass over the training loader, one batched product per batch. With ``num_samples`` it
averages over a seeded random subsample of ``num_samples`` examples instead (chosen once, so
the operator stays a fixed symmetric matrix, as CG and Lanczos require).

:class:`OperatorCurvature` is the abstract base of the curvatures built on it: it fits
``operator_`` and makes :meth:`~Curvature.residual` measure against the true operator.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_unflatten

from .._loader import iterate_batches
from .._params_base import check_is_fitted
from ..gradients.functional import per_sample_grads, split_batch
from ..params import ParameterLayout
from ..tasks import Task
from ._base import Curvature, check_finite_statistics
from ._products import batch_matmat, check_curvature_type


def select_examples(task: Task, batch: Any, index: torch.Tensor) -> Any:
    """The examples ``index`` of ``batch``, as a batch of the same structure."""
    leaves, spec, batched, _ = split_batch(task, batch)
    picked = [leaf[index.to(leaf.device)] if b else leaf for leaf, b in zip(leaves, batched)]
    return tree_unflatten(picked, spec)


def check_num_samples(num_samples: Any, owner: str) -> int | None:
    if num_samples is None:
        return None
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"{owner}: num_samples must be a positive integer or None (all examples); got "
            f"{num_samples!r}."
        )
    return num_samples


class CurvatureOperator:
    """``V ↦ C V`` for the mean curvature over a loader (or a seeded subsample of it).

    Args:
        curvature_type: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (see :mod:`._products`).
        model, task, layout: the model, how batches are read, the attributed parameters.
        loader: the training batches; iterated once per :meth:`matmat`, so it must be
            re-iterable (a DataLoader or a list, not a generator).
        num_samples: average over this many examples drawn without replacement (seeded by
            ``seed``) instead of all of them; the drawn examples are held in memory.
        seed: seed of the subsample.
        chunk_size: rows of ``V`` per vmapped product (memory bound).

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask, select_parameters
        >>> model = torch.nn.Linear(3, 2).double()
        >>> loader = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))]
        >>> op = CurvatureOperator("ggn", model, ClassificationTask(),
        ...                        select_parameters(model), loader)
        >>> op.matmat(torch.eye(8, dtype=torch.float64)).shape
        torch.Size([8, 8])
    """

    def __init__(
        self,
        curvature_type: str,
        model: nn.Module,
        task: Task,
        layout: ParameterLayout,
        loader: Iterable[Any],
        num_samples: int | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
    ):
        self.curvature_type = check_curvature_type(curvature_type)
        self.model = model
        self.task = task
        self.layout = layout
        self.chunk_size = chunk_size
        first = next(iter(layout.tensors(model).values()))
        self.dtype, self.device = first.dtype, first.device
        if num_samples is None:
            self.loader = loader
            self.num_examples = sum(task.num_examples(b) for b in iterate_batches(loader, "loader"))
            self._list: list | None = None
        else:
            self._list = _subsample(task, loader, num_samples, seed)
            self.loader = self._list
            self.num_examples = num_samples

    def batches(self) -> Iterator[Any]:
        """The batches the operator averages over."""
        return iterate_batches(self.loader, "loader")

    def batch_list(self) -> list:
        """The batches as a list (materialised once, for random access by LiSSA)."""
        if self._list is None:
            self._list = list(self.batches())
        return self._list

    def _product(self, batch: Any, V: torch.Tensor, offset: int) -> torch.Tensor:
        with torch.no_grad():  # torch.func transforms still differentiate; no graph is kept
            out = batch_matmat(
                self.curvature_type, self.model, self.task, self.layout, batch, V, self.chunk_size
            )
        check_finite_statistics(out, self.model, self.task, batch, self.layout, offset)
        return out.double()

    def batch_matmat(self, batch: Any, V: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``C_batch V``: the mean curvature of one batch on the rows of ``V`` (float64).

        ``offset``, the batch's first example index, only labels errors.
        """
        out = self._product(batch, V.to(self.device, self.dtype), offset)
        return out / self.task.num_examples(batch)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``C V`` on the rows of ``V`` (``(n, P)``), in float64 on the parameters' device.

        Raises:
            NonFiniteGradientError: when a batch's products are NaN/inf (names the examples).
        """
        out = torch.zeros(V.shape, dtype=torch.float64, device=self.device)
        Vm = V.to(self.device, self.dtype)
        offset = 0
        for batch in self.batches():
            out += self._product(batch, Vm, offset)
            offset += self.task.num_examples(batch)
        return out / self.num_examples

    def top_eigenvalue(self, num_iters: int = 20, seed: int = 0) -> float:
        """Largest-magnitude eigenvalue of ``C`` by power iteration (float64)."""
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(1, self.layout.num_params, generator=g, dtype=torch.float64)
        v = (v / v.norm()).to(self.device)
        value = 0.0
        for _ in range(num_iters):
            w = self.matmat(v)
            value = float((w * v).sum())
            norm = w.norm()
            if not torch.isfinite(norm) or norm == 0:
                break
            v = w / norm
        return value

    def mean_squared_gradients(self) -> torch.Tensor:
        """``(1/N) Σ_j ∇ℓ(z_j)²`` elementwise, ``(P,)``: the empirical Fisher's diagonal."""
        total = torch.zeros(self.layout.num_params, dtype=torch.float64, device=self.device)
        for batch in self.batches():
            with torch.no_grad():
                G = per_sample_grads(self.model, self.task, batch, self.layout)
            total += G.double().pow(2).sum(0)
        return total / self.num_examples


def _subsample(task: Task, loader: Iterable[Any], num_samples: int, seed: int) -> list:
    batches = list(iterate_batches(loader, "loader"))
    sizes = [task.num_examples(b) for b in batches]
    total = sum(sizes)
    if num_samples > total:
        raise ValueError(
            f"num_samples={num_samples} exceeds the {total} examples of the loader. Use "
            f"num_samples <= {total}, or None for all examples."
        )
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=g)[:num_samples].sort().values
    out, start = [], 0
    for batch, size in zip(batches, sizes):
        local = chosen[(chosen >= start) & (chosen < start + size)] - start
        if local.numel():
            out.append(select_examples(task, batch, local))
        start += size
    return out


class OperatorCurvature(Curvature):
    """Abstract base of curvatures that reach ``C`` through a :class:`CurvatureOperator`.

    Subclasses call :meth:`_make_operator` in ``_fit``. ``_matmat`` defaults to the exact
    operator product ``C V + λV``; approximations (Arnoldi, DataInf) override ``_matmat`` with
    their own matrix, while :meth:`residual` keeps measuring against the exact operator.
    """

    def _make_operator(self, model, task, loader, layout) -> CurvatureOperator:
        self.operator_ = CurvatureOperator(
            self.curvature_type, model, task, layout, loader,
            num_samples=check_num_samples(getattr(self, "num_samples", None), type(self).__name__),
            seed=getattr(self, "seed", 0),
            chunk_size=getattr(self, "chunk_size", None),
        )
        return self.operator_

    def exact_matmat(self, V: torch.Tensor, damping: float | None = None) -> torch.Tensor:
        """The true ``(C + λI)`` on the rows of ``V``, whatever this curvature approximates."""
        check_is_fitted(self, "layout_", "exact_matmat()")
        V = self._check_rows(V, "V")
        return self._exact_matmat(V, self._damping(damping)).to(V.dtype)

    def _exact_matmat(self, V: torch.Tensor, damping) -> torch.Tensor:
        return self.operator_.matmat(V).to(V.device) + damping * V.double()

    def _matmat(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        return self._exact_matmat(V, damping)
