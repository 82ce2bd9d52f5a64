"""The matrix-free curvature operator shared by ``CG``, ``LiSSA``, ``Arnoldi`` and ``DataInf``.

:class:`CurvatureOperator` applies ``C = (1/N) Σ_j C_j`` (the curvature of the **mean**
training loss, :mod:`._products` for ``C_j``) to the rows of ``V`` (``(n, P)``) without forming
it: one pass over the training loader, one batched product per batch. With ``num_samples`` it
averages over a seeded random subsample of ``num_samples`` examples instead (chosen once, so
the operator stays a fixed symmetric matrix, as CG and Lanczos require).

Under ``torch.distributed`` (more than one rank) and without ``num_samples``, the operator is
**data-parallel**: each rank iterates only its contiguous shard of the loader
(:func:`influence.distributed.shard`) in :meth:`~CurvatureOperator.matmat` and
:meth:`~CurvatureOperator.mean_squared_gradients`, and the shard sums and example counts are
all-reduced, so every rank gets the same full-data product. :meth:`~CurvatureOperator.matmat`
is then a collective: every rank must call it the same number of times with the same ``V``
(CG, Lanczos and power iteration do, since their inputs are identical on every rank;
:func:`replicated_rows` handles rows that differ across ranks). With ``num_samples`` every
rank holds the same seeded subsample and computes the product alone (no reduction).
LiSSA's minibatch products (:meth:`~CurvatureOperator.batch_matmat` on
:meth:`~CurvatureOperator.batch_list`, the full list on every rank) are never reduced: its
recursion is replicated on every rank, only its scale estimate is data-parallel.

:class:`OperatorCurvature` is the abstract base of the curvatures built on it: it fits
``operator_`` and makes :meth:`~Curvature.residual` measure against the true operator.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .. import distributed
from .._loader import iterate_batches
from ..exceptions import InfluenceError
from .._params_base import check_is_fitted
from .._progress import solver_progress, track
from ..gradients.functional import per_sample_grads, take_examples
from ..params import ParameterLayout
from ..tasks import Task
from ._base import Curvature, check_finite_statistics
from ._linearized import GradientRows, Linearizer
from ._products import batch_matmat, check_curvature_type


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
        model: the model.
        task: how batches are read (a :class:`~influence.tasks.Task`).
        layout: the attributed parameters (a :class:`~influence.params.ParameterLayout`).
        loader: the training batches; iterated once per :meth:`matmat`, so it must be
            re-iterable (a DataLoader or a list, not a generator).
        num_samples: average over this many examples drawn without replacement (seeded by
            ``seed``) instead of all of them; the drawn examples are held in memory.
        seed: seed of the subsample.
        chunk_size: rows of ``V`` per vmapped product (memory bound).
        cache_bytes: the first :meth:`matmat` keeps every batch's *linearisation*
            (:mod:`._linearized`) when all of them fit in this many bytes (estimated from the
            first batch), and later products read neither the data nor the model: for
            ``"fisher"`` the per-example gradients (``(V Gᵀ) G``); for ``"ggn"`` with few outputs
            per example the output Jacobians and output-loss Hessians (three small matrix
            products); for ``"hessian"`` the autograd graph of the batch gradient (one backward
            pass per product instead of three passes through the model). Iterative solvers
            then cost about one pass over the data in all. ``0`` turns the cache off. LiSSA's
            minibatch products (:meth:`batch_matmat` with ``index``) use and fill the same cache.

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
        cache_bytes: int = 2**30,
    ):
        self.curvature_type = check_curvature_type(curvature_type, task)
        self.cache_bytes = cache_bytes
        self._entries: dict[int, Any] = {}  # batch position -> linearisation
        self._caching: bool | None = None if cache_bytes > 0 else False  # None: not decided yet
        self._complete = False  # every position of the batches this rank sums over is cached
        self.model = model
        self.task = task
        self.layout = layout
        self.chunk_size = chunk_size
        first = next(iter(layout.tensors(model).values()))
        self.dtype, self.device = first.dtype, first.device
        self._full_loader = loader
        self.sharded = False
        if num_samples is None:
            self.loader, self.sharded = _shard_if_possible(loader)
            local = sum(task.num_examples(b) for b in iterate_batches(self.loader, "loader"))
            self.num_local_examples = local
            self.num_examples = sum(distributed.all_gather_counts(local)) if self.sharded else local
            self._list: list | None = None
        else:
            self._list = _subsample(task, loader, num_samples, seed)
            self.loader = self._list
            self.num_examples = self.num_local_examples = num_samples
        self._linearizer = Linearizer(self.curvature_type, model, task, layout)

    def batches(self) -> Iterator[Any]:
        """The batches this rank averages over (its shard when :attr:`sharded`)."""
        return iterate_batches(self.loader, "loader")

    def batch_list(self) -> list:
        """All batches as a list (materialised once, for random access by LiSSA).

        The full loader (or subsample) on every rank, even when :attr:`sharded`.
        """
        if self._list is None:
            self._list = list(iterate_batches(self._full_loader, "loader"))
        return self._list

    def _product(self, batch: Any, V: torch.Tensor, offset: int) -> torch.Tensor:
        out = batch_matmat(
            self.curvature_type, self.model, self.task, self.layout, batch, V, self.chunk_size
        )
        check_finite_statistics(out, self.model, self.task, batch, self.layout, offset)
        return out.double()

    def batch_matmat(self, batch: Any, V: torch.Tensor, offset: int = 0, index: int | None = None) -> torch.Tensor:
        """``C_batch V``: the mean curvature of one batch on the rows of ``V`` (float64).

        ``offset``, the batch's first example index, only labels errors. ``index``, the
        batch's position in :meth:`batch_list`, lets the product use (and fill) the
        linearisation cache; not when :attr:`sharded` (the list then differs from the shard).
        """
        Vm = V.to(self.device, self.dtype)
        if index is None or self.sharded:
            out = self._product(batch, Vm, offset)
        else:
            out = self._cached_product(index, batch, Vm, offset)
        return out / self.task.num_examples(batch)

    def _positions(self) -> Iterable[tuple[int, Any]]:
        """``(position, batch)`` of the batches :meth:`matmat` sums over: the materialised
        :meth:`batch_list` once there is one and the operator is not sharded (so that its
        indices and the cache's agree), else this rank's batches as the loader yields them."""
        if not self.sharded and self._list is not None:
            return enumerate(self._list)
        return enumerate(self.batches())

    def _cached_product(self, index: int, batch: Any, V: torch.Tensor, offset: int) -> torch.Tensor:
        """``C_batch V`` (summed, float64) through the batch's cached linearisation, built now
        if the cache is (or may still be) on."""
        entry = self._entries.get(index)
        if entry is None and self._caching is not False:
            entry = self._linearize(batch, offset)
            if entry is not None:
                self._entries[index] = entry
        if entry is None:
            return self._product(batch, V, offset)
        out = entry.apply(V)
        check_finite_statistics(out, self.model, self.task, batch, self.layout, offset)
        return out.double()

    def _linearize(self, batch: Any, offset: int):
        """A linearisation of ``batch``; on the first, decides whether all would fit
        ``cache_bytes`` (and turns the cache off if not)."""
        if self.curvature_type == "fisher":
            G = per_sample_grads(self.model, self.task, batch, self.layout)
            check_finite_statistics(G, self.model, self.task, batch, self.layout, offset)
            entry = GradientRows(G)
        else:
            entry = self._linearizer(batch)
        if entry is None:
            self._caching = False
        elif self._caching is None:
            per_example = entry.nbytes / max(self.task.num_examples(batch), 1)
            self._caching = per_example * self.num_local_examples <= self.cache_bytes
        if not self._caching:
            self._entries.clear()
            return None
        return entry

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``C V`` on the rows of ``V`` (``(n, P)``), in float64 on the parameters' device.

        Raises:
            NonFiniteGradientError: when a batch's products are NaN/inf (names the examples).
        """
        out = torch.zeros(V.shape, dtype=torch.float64, device=self.device)
        Vm = V.to(self.device, self.dtype)
        if self._complete:
            for entry in self._entries.values():
                out += entry.apply(Vm).double()
            if not bool(torch.isfinite(out).all()):  # redo it batch by batch, which names the examples
                self._complete = False
                return self.matmat(V)
            return self._reduce(out) / self.num_examples
        offset = count = 0
        for index, batch in self._positions():
            out += self._cached_product(index, batch, Vm, offset)
            offset += self.task.num_examples(batch)
            count = index + 1
        self._complete = bool(self._caching) and len(self._entries) == count > 0
        return self._reduce(out) / self.num_examples

    def _reduce(self, total: torch.Tensor) -> torch.Tensor:
        """Sums a shard's total over the ranks when the operator is sharded."""
        return distributed.all_reduce_sum(total) if self.sharded else total

    def dense(self) -> torch.Tensor:
        """``C`` as a dense float64 ``(P, P)`` matrix (a collective when :attr:`sharded`).

        Per batch the cheapest way available (:meth:`Linearizer.dense`): from the cached
        linearisation when it has a dense form (``GᵀG``, ``Σ_j J_jᵀ H_j J_j``), else by ``P``
        products in memory-bounded column blocks.
        """
        P = self.layout.num_params
        out = torch.zeros(P, P, dtype=torch.float64, device=self.device)
        offset = 0
        for index, batch in track(self._positions(), "dense curvature", self.loader):
            entry = self._entries.get(index)
            if entry is None and self.curvature_type == "fisher":
                entry = GradientRows(per_sample_grads(self.model, self.task, batch, self.layout))
            block = self._linearizer.dense(batch, self.chunk_size, entry)
            check_finite_statistics(block, self.model, self.task, batch, self.layout, offset)
            out += block
            offset += self.task.num_examples(batch)
        out = self._reduce(out) / self.num_examples
        return 0.5 * (out + out.T)

    def top_eigenvalue(self, num_iters: int = 20, seed: int = 0) -> float:
        """Largest-magnitude eigenvalue of ``C`` by power iteration (float64)."""
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(1, self.layout.num_params, generator=g, dtype=torch.float64)
        v = (v / v.norm()).to(self.device)
        value = 0.0
        with solver_progress("power iteration", num_iters) as bar:
            for _ in range(num_iters):
                w = self.matmat(v)
                value = float((w * v).sum())
                if bar is not None:
                    bar.update(eigenvalue=value)
                norm = w.norm()
                if not torch.isfinite(norm) or norm == 0:
                    break
                v = w / norm
            if bar is not None:
                bar.finish(eigenvalue=value)
        return value

    def mean_squared_gradients(self) -> torch.Tensor:
        """``(1/N) Σ_j ∇ℓ(z_j)²`` elementwise, ``(P,)``: the empirical Fisher's diagonal."""
        total = torch.zeros(self.layout.num_params, dtype=torch.float64, device=self.device)
        for batch in self.batches():
            G = per_sample_grads(self.model, self.task, batch, self.layout)
            total += G.double().pow(2).sum(0)
        return self._reduce(total) / self.num_examples


def _shard_if_possible(loader: Iterable[Any]) -> tuple[Iterable[Any], bool]:
    """``(this rank's shard, True)`` under torch.distributed; ``(loader, False)`` otherwise.

    When some rank cannot be given a shard (an unsized loader, or fewer items than ranks),
    every rank falls back to the full loader (all ranks agree, so the collectives match).
    """
    if not distributed.is_active():
        return loader, False
    try:
        local, ok = distributed.shard(loader), True
    except InfluenceError:
        local, ok = loader, False
    if all(distributed.all_gather_objects(ok)):
        return local, True
    return loader, False


def replicated_rows(fn, V: torch.Tensor, sharded: bool) -> torch.Tensor:
    """``fn(V)`` for a row-wise collective ``fn`` (e.g. a sharded :meth:`CurvatureOperator.matmat`
    or a CG solve on it) when the ranks may hold different ``V``.

    Every rank must call this the same number of times (``V`` may have 0 rows). When all ranks
    hold the same ``V``, ``fn`` runs on it directly; otherwise on the rows of all ranks
    concatenated in rank order, and each rank keeps its own rows.
    """
    if not sharded:
        return fn(V)
    import hashlib

    data = V.detach().cpu().contiguous()
    digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    token = (tuple(data.shape), str(data.dtype), digest)
    if len(set(distributed.all_gather_objects(token))) == 1:
        return fn(V)
    counts = distributed.all_gather_counts(V.shape[0], V.device)
    rank = distributed.rank_and_world()[0]
    start = sum(counts[:rank])
    return fn(distributed.all_gather_cat(V))[start : start + V.shape[0]]


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
            out.append(take_examples(task, batch, local))
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
        # a collective when the operator is sharded; V may differ across ranks (residual)
        product = replicated_rows(self.operator_.matmat, V, self.operator_.sharded)
        return product.to(V.device) + damping * V.double()

    @property
    def _collective_solve(self) -> bool:
        """True when ``solve`` is a collective (every rank must call it equally often)."""
        return False

    def _matmat(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        return self._exact_matmat(V, damping)
