"""``InfluenceEstimator``: fit a curvature once, then score queries against training data.

Score convention (everywhere in the library)::

    score[i, j] = ∇m(z_test_i)ᵀ (C + λI)⁻¹ ∇ℓ(z_train_j)

with ``m`` the task's measurement, ``ℓ`` the per-example training loss and ``C`` the
curvature of the mean training loss. **Positive = helpful**: up-weighting training example
``j`` lowers query ``i``'s loss. Removing ``j`` from ``N`` training examples changes the
query's measurement by approximately ``+score[i, j] / N`` (the leave-one-out estimate).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ._files import exclusive_lock
from ._fingerprint import check_same_inputs
from ._loader import iterate_batches, warn_if_shuffled
from ._params_base import ParamsMixin, check_is_fitted, clone
from ._progress import logger, run_options, timed, track
from ._topk import check_k, streaming_top_k
from .curvature._base import Curvature, check_instance
from .curvature.identity import Identity
from .distributed import DEFAULT_TIMEOUT, all_gather_cat, all_gather_counts, check_same_model, merge_top_k, shard, stage as distributed_stage
from ._guards import check_deterministic, check_finite, report_unmeasured, unmeasured_examples, warn_if_dropout_active
from .exceptions import ModelChangedError, NonFiniteGradientError
from .gradients.hooks import GRADIENT_METHODS, GradientComputer
from .params import ParamSpec, model_changes, model_state, parameter_fingerprint, select_parameters
from .scoring import Scorer, ScoringConfig
from .tasks import ClassificationTask, Task


def _staged(stage: str):
    """Runs a public method with the estimator's run options and adds its time to ``timings_``."""

    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            previous = getattr(self, "timings_", None)
            if stage == "fit" or previous is None:
                self.timings_ = {}
            timeout = getattr(self, "distributed_timeout", DEFAULT_TIMEOUT)
            try:
                with run_options(progress=self.progress, timings=self.timings_), timed(stage), distributed_stage(stage, timeout):
                    return method(self, *args, **kwargs)
            except BaseException:
                if stage == "fit":  # a failed fit leaves the estimator as it was
                    self.__dict__.pop("timings_")
                    if previous is not None:
                        self.timings_ = previous
                raise

        return run

    return wrap


class InfluenceEstimator(ParamsMixin):
    """Influence scores of training examples on queries, through a pluggable curvature.

    Args:
        curvature: a :class:`~influence.curvature.Curvature` instance (cloned at ``fit``);
            default ``Identity()`` (gradient dot products).
        task: reads batches; default ``ClassificationTask()``.
        params: attributed parameters: ``"trainable"``, ``"all"``, glob patterns or a layout.
        chunk_size: examples per vmap chunk for per-example gradients (memory bound).
        score_dtype: dtype of score accumulation (float32 or higher).
        gradient_method: ``"auto"`` (hook path for Linear/Conv2d/Embedding/LayerNorm, torch.func
            for the rest), ``"hooks"`` or ``"func"`` (see :mod:`influence.gradients.hooks`).
        scoring: a :class:`~influence.scoring.ScoringConfig` (ghost / materialised / low-rank /
            projected per layer, precision, ``max_memory``); ``None`` for the defaults.

        progress: tqdm progress bars on long loops: ``True``, ``False``, or ``None`` for "only
            when stderr is a terminal".
        self_check: guard against silently wrong scores (on by default; cheap): at ``fit``,
            compare the hook path's per-example gradients with torch.func's on two examples of
            the first batch (a mismatching layer falls back to torch.func with a warning), and
            at ``fit`` and every scoring call, compute the loss of the first batch twice and
            raise :class:`~influence.exceptions.StochasticModelError` if they differ (dropout
            left on). ``False`` skips both (a warning still names active dropout modules).
        distributed_timeout: under ``torch.distributed``, seconds a rank waits at a collective
            for the others before raising ``DistributedTimeoutError`` naming the stage and the
            ranks that did not arrive (default 300); ``None``: the process group's timeout.

    Fitted attributes: ``model_``, ``curvature_``, ``layout_``, ``num_train_``,
    ``fingerprint_``, ``timings_`` (seconds per stage, e.g. ``"fit"``, ``"pairwise_scores"``;
    ``fit`` resets it, scoring adds to it), ``gradients_``, ``gradient_coverage_`` (how each
    module's per-example gradients are computed: ``"hooks"`` or ``"func"``, with the reason and
    batch axis, see :mod:`influence.gradients.plan`); after scoring, ``plan_`` reports the
    per-layer choices of :mod:`influence.scoring`.

    Under ``torch.distributed`` (more than one rank) fitting and scoring are data-parallel over
    contiguous shards of the training loader and every rank returns the full result
    (:mod:`influence.distributed`). :meth:`save` and :meth:`load` persist a fitted estimator
    (:mod:`influence.io`).

    Examples:
        >>> import torch
        >>> from influence import InfluenceEstimator, Exact, ClassificationTask
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> train = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))]
        >>> est = InfluenceEstimator(Exact(damping=0.1), ClassificationTask()).fit(model, train)
        >>> est.pairwise_scores(train).shape
        torch.Size([6, 6])
    """

    def __init__(
        self,
        curvature: Curvature | None = None,
        task: Task | None = None,
        params: ParamSpec = "trainable",
        chunk_size: int | None = None,
        score_dtype: torch.dtype = torch.float32,
        progress: bool | None = None,
        gradient_method: str = "auto",
        scoring: ScoringConfig | None = None,
        self_check: bool = True,
        distributed_timeout: float | None = DEFAULT_TIMEOUT,
    ):
        self.curvature = curvature
        self.task = task
        self.params = params
        self.chunk_size = chunk_size
        self.score_dtype = score_dtype
        self.progress = progress
        self.gradient_method = gradient_method
        self.scoring = scoring
        self.self_check = self_check
        self.distributed_timeout = distributed_timeout

    # ----------------------------------------------------------------------------- fitting
    @_staged("fit")
    def fit(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 50,
    ) -> "InfluenceEstimator":
        """Fits the curvature on the training data; returns self.

        Args:
            checkpoint_dir: where to save the fit's partial sums every ``checkpoint_every``
                batches; a killed fit run again with the same directory resumes where it
                stopped, with identical results (curvatures on the statistics protocol).
        """
        curvature = Identity() if self.curvature is None else self.curvature
        check_instance(curvature, Curvature, "curvature")
        task = ClassificationTask() if self.task is None else self.task
        check_instance(task, Task, "task")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if self.score_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"score_dtype must be torch.float32 or torch.float64; got {self.score_dtype}."
            )
        if self.gradient_method not in GRADIENT_METHODS:
            raise ValueError(f"Invalid gradient_method {self.gradient_method!r}. Supported: {GRADIENT_METHODS}.")
        if self.scoring is not None:
            check_instance(self.scoring, ScoringConfig, "scoring")
            self.scoring.validate()
        warn_if_shuffled(train_loader, "train_loader")
        first = next(iterate_batches(train_loader, "train_loader"))
        task.num_examples(first)  # format errors now, not at scoring
        self._check_deterministic(model, task, first, "training")
        layout = select_parameters(model, self.params)
        check_same_model(parameter_fingerprint(model, layout))  # under torch.distributed
        check_same_inputs("fit", task, train=train_loader)
        gradients = GradientComputer(model, task, layout, self.gradient_method, self.chunk_size, self.self_check)
        gradients.prepare(first)  # which layers the hook path computes (and the self-check)
        directory = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        if directory is not None and not curvature._uses_statistics():
            logger.warning("%s does not fit through the statistics protocol: checkpoint_dir is not used.", type(curvature).__name__)
        lock = contextlib.nullcontext() if directory is None else exclusive_lock(
            os.path.join(directory, ".lock"), f"The checkpoint directory {directory}")  # one fit per directory
        with lock, run_options(checkpoint_dir=directory, checkpoint_every=checkpoint_every, self_check=self.self_check):
            fitted = clone(curvature).fit(model, task, train_loader, layout)
        state = model_state(model)
        # the fitted state is set only now, all at once: a fit that raises above leaves the
        # estimator exactly as it was (still fitted to the previous model, or unfitted)
        self.task_, self.layout_, self.curvature_, self.model_ = task, layout, fitted, model
        self.train_loader_ = train_loader
        self._num_train = None  # counted on first use of num_train_ (no extra loader pass in fit)
        self.fingerprint_ = state
        self.gradients_ = gradients
        return self

    @property
    def gradient_coverage_(self) -> dict[str, dict[str, Any]]:
        """How each module's per-example gradients are computed (see :meth:`GradientComputer.coverage`)."""
        check_is_fitted(self, "curvature_", "gradient_coverage_")
        return self._computer().coverage()

    def _check_deterministic(self, model: nn.Module, task: Task, batch: Any, stage: str) -> None:
        if self.self_check:
            check_deterministic(model, task, batch, stage)
        else:
            warn_if_dropout_active(model)

    @property
    def num_train_(self) -> int:
        """Number of training examples; counted over ``train_loader`` on first access only."""
        check_is_fitted(self, "curvature_", "num_train_")
        if getattr(self, "_num_train", None) is None:
            loader = iterate_batches(self.train_loader_, "train_loader")
            self._num_train = sum(self.task_.num_examples(b) for b in loader)
        return self._num_train

    @num_train_.setter
    def num_train_(self, value: int) -> None:
        self._num_train = int(value)

    # ----------------------------------------------------------------------------- gradients
    def _check_model(self, method: str, loader: Iterable[Any] | None = None, stage: str = "query") -> None:
        """Raises :class:`ModelChangedError` naming what changed since ``fit``; given
        ``loader``, also checks that the model is deterministic on its first batch.

        Compares :func:`~influence.params.model_state`: every parameter and persistent
        floating buffer (attributed or not: all of them shape the gradients, e.g. BatchNorm
        running statistics) and every module's class and hyperparameters (a swapped
        activation). ``train()``/``eval()`` and ``requires_grad`` are not part of it.
        """
        check_is_fitted(self, "curvature_", method)
        changes = model_changes(self.fingerprint_, model_state(self.model_), self.layout_.names)
        if changes:
            raise ModelChangedError(
                f"The model changed after fit(): {'; '.join(changes)}. The fitted curvature and "
                "the scores no longer match it (e.g. more training steps, other weights, other "
                "layers). Call fit(model, train_loader) again."
            )
        if loader is not None:
            self._check_first_batch(loader, stage)

    def _check_first_batch(self, loader: Iterable[Any], stage: str) -> None:
        """The model is deterministic on the loader's first batch (catches ``model.train()``)."""
        first = next(iterate_batches(loader, f"{'test' if stage == 'query' else 'train'}_loader"))
        self._check_deterministic(self.model_, self.task_, first, stage)

    def _gradients(
        self, loader: Iterable[Any], objective: str, what: str, unmeasured: list[int] | None = None
    ) -> Iterator[torch.Tensor]:
        """Yields per-example gradient blocks ``(B, P)`` of the loader, checked finite; appends
        the indices of examples with nothing measured (zero gradient) to ``unmeasured``."""
        offset = 0
        for batch in track(iterate_batches(loader, f"{what}_loader"), f"{what} gradients", loader):
            G = self._computer().flat(batch, objective)
            check_finite(G, offset, what)
            if unmeasured is not None:
                unmeasured += unmeasured_examples(self.task_, batch, offset, G)
            offset += G.shape[0]
            yield G

    @_staged("influence_factors")
    def influence_factors(self, test_loader: Iterable[Any]) -> torch.Tensor:
        """Preconditioned query gradients ``(C + λI)⁻¹ ∇m(z_test)``, shape ``(n_test, P)``."""
        self._check_model("influence_factors()", test_loader)
        check_same_inputs("influence_factors", self.task_, test=test_loader)
        unmeasured: list[int] = []
        blocks = [self.curvature_.solve(G) for G in self._gradients(test_loader, "measurement", "test", unmeasured)]
        report_unmeasured(unmeasured, sum(len(b) for b in blocks), "test", strict=True)
        return torch.cat(blocks).to(self.score_dtype)

    # ----------------------------------------------------------------------------- scores
    @_staged("pairwise_scores")
    def pairwise_scores(
        self,
        test_loader: Iterable[Any],
        train_loader: Iterable[Any] | None = None,
        *,
        out: str | os.PathLike | None = None,
        checkpoint_every: int = 50,
        per_module: bool = False,
        per_token: bool = False,
        aggregate_queries: bool | str = False,
    ) -> torch.Tensor:
        """Scores of every training example on every query, shape ``(n_test, n_train)``.

        Queries are preconditioned once and held; the training set is streamed one batch at a
        time (one pass), never holding all training gradients.

        Args:
            out: a ``.npy`` path: the matrix is written there in column blocks through a
                memory map and a read-only ``numpy.memmap`` is returned instead of a tensor, so
                the matrix never has to fit in memory. Its full size is reserved on disk first.
                Progress is saved every ``checkpoint_every`` training batches; the same call
                run again after a crash resumes where it stopped, and a partial file of other
                data is refused; a lock keeps two runs from writing one file (see
                :mod:`influence._outputs`).
            per_module: ``(n_test, n_train, n_modules)``: each module's term of the score, in
                :attr:`module_names_` order, summing over modules to the score (for curvatures
                that couple modules, a decomposition of the sum; :mod:`influence._decompose`).
            per_token: language models: ``(n_test, n_train, T)``, the term of each token
                position ``t`` of the training sequence (``T``: the longest), summing over
                tokens to the score, 0 past a sequence's end (:mod:`influence._decompose`).
            aggregate_queries: ``True`` or ``"mean"`` (``"sum"``): score the mean (sum) of the
                preconditioned queries as one query, in one pass with one resident query;
                the query axis has length 1 (:mod:`influence._aggregate`).
        """
        from ._decompose import check_split, check_supported, split_pairwise

        split = check_split(per_module, per_token, out)
        scorer = self._scorer("pairwise_scores()", test_loader, aggregate_queries)
        if split:
            check_supported(split, scorer, self.task_, self._train(train_loader))
        check_same_inputs("pairwise_scores", self.task_, train=self._full_train(train_loader), test=test_loader)
        if out is not None:
            from ._outputs import write_pairwise

            return write_pairwise(self, scorer, test_loader, self._train(train_loader), os.fspath(out), checkpoint_every)
        if split:
            scores = split_pairwise(scorer, test_loader, self._train(train_loader), split)
        else:
            scores = scorer.pairwise(test_loader, self._train(train_loader))
        return all_gather_cat(scores, dim=1)  # the ranks' columns

    @_staged("self_scores")
    def self_scores(self, loader: Iterable[Any] | None = None) -> torch.Tensor:
        """Self-influence ``∇ℓ(z)ᵀ (C + λI)⁻¹ ∇ℓ(z)`` of each example, shape ``(n,)``.

        Large values flag unusual, often mislabeled, examples. Defaults to the training set.
        """
        self._check_model("self_scores()")
        self._check_first_batch(self._train(loader), "training")
        check_same_inputs("self_scores", self.task_, train=self._full_train(loader))
        out = []
        if type(self.curvature_) is Identity and self.scoring is None:  # ghost norms
            lam, offset, unmeasured = self.curvature_._damping(None), 0, []
            for batch in iterate_batches(self._train(loader), "train_loader"):
                norms = self._computer().compute(batch, "loss").sq_norms()
                check_finite(norms, offset, "train")  # as the other paths check their gradients
                unmeasured += unmeasured_examples(self.task_, batch, offset, norms)
                offset += norms.shape[0]
                norms = norms.to(self.score_dtype)
                out.append(norms / lam if lam else self.curvature_.solve(norms[:, None]))
            report_unmeasured(unmeasured, offset, "train", strict=False)
            return all_gather_cat(torch.cat(out))  # the ranks' shards
        train, pad = self._train(loader), 0
        if getattr(self.curvature_, "_collective_solve", False):
            # CG under torch.distributed: solve is a collective, so a rank with fewer batches
            # joins the others' remaining solves with no rows (shards are sized)
            pad = max(all_gather_counts(len(train))) - len(train)
        unmeasured: list[int] = []
        for G in self._gradients(train, "loss", "train", unmeasured):
            out.append((self.curvature_.solve(G).to(self.score_dtype) * G.to(self.score_dtype)).sum(1))
        report_unmeasured(unmeasured, sum(len(o) for o in out), "train", strict=False)
        for _ in range(pad):
            self.curvature_.solve(G[:0])
        return all_gather_cat(torch.cat(out))  # the ranks' shards

    @_staged("top_k")
    def top_k(
        self,
        test_loader: Iterable[Any],
        k: int,
        largest: bool = True,
        train_loader: Iterable[Any] | None = None,
        *,
        aggregate_queries: bool | str = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most helpful (``largest=False``: most harmful) training examples per query.

        Streams the training set, keeping only a running top-k: memory ``O(n_test · k)``.
        ``aggregate_queries="mean"`` (or ``True``, or ``"sum"``) ranks for the mean (sum) of
        the queries, as :meth:`pairwise_scores` does (one row).

        Returns:
            ``(values, indices)``, each ``(n_test, k)``, sorted from most to least extreme;
            indices count training examples in loader order.
        """
        check_k(k)
        scorer = self._scorer("top_k()", test_loader, aggregate_queries)
        check_same_inputs("top_k", self.task_, train=self._full_train(train_loader), test=test_loader)
        rows = []
        for queries in scorer.query_groups(test_loader):
            rows.append(streaming_top_k(
                scorer.columns(queries, self._train(train_loader)), k, largest,
                reduce=lambda v, i, n: merge_top_k(v, i, n, k, largest),  # across ranks
            ))
            del queries  # before the next group is prepared
        return torch.cat([v for v, _ in rows]), torch.cat([i for _, i in rows])

    def _computer(self) -> GradientComputer:
        """Per-example gradients (hook path + torch.func); rebuilt after :meth:`load`."""
        if getattr(self, "gradients_", None) is None:
            self.gradients_ = GradientComputer(self.model_, self.task_, self.layout_, self.gradient_method, self.chunk_size, self.self_check)
        return self.gradients_

    @property
    def module_names_(self) -> tuple[str, ...]:
        """The modules holding attributed parameters, in :attr:`gradient_coverage_` order: the
        last axis of ``pairwise_scores(..., per_module=True)``."""
        return tuple(self.gradient_coverage_)

    def _scorer(self, method: str, test_loader: Iterable[Any], aggregate_queries: bool | str = False) -> Scorer:
        """Single-pass scorer (resident queries; see :mod:`influence.scoring`); sets ``plan_``."""
        from ._aggregate import check_aggregate

        aggregate = check_aggregate(aggregate_queries)
        self._check_model(method, test_loader)
        scorer = Scorer(self._computer(), self.curvature_, self.scoring, self.score_dtype, aggregate)
        self.plan_ = scorer.plan  # filled in by the first query batch
        return scorer

    def _full_train(self, loader: Iterable[Any] | None) -> Iterable[Any]:
        """The training loader to score, before sharding."""
        if loader is None:
            if getattr(self, "curvature_", None) is not None and getattr(self, "train_loader_", None) is None:
                raise ValueError(
                    "This estimator has no training loader (it was loaded from a file): pass "
                    "train_loader=... to score."
                )
            check_is_fitted(self, "train_loader_", "scoring")
            return self.train_loader_
        return loader

    def _train(self, loader: Iterable[Any] | None) -> Iterable[Any]:
        """The training loader to score: this rank's shard under torch.distributed."""
        if loader is not None:
            warn_if_shuffled(loader, "train_loader")
        return shard(self._full_train(loader))

    # ----------------------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> None:
        """Saves the fitted estimator to ``path`` (safetensors + JSON metadata, atomically).

        The model and the loaders are not saved: pass the model to :meth:`load`.
        """
        from .io import save_estimator

        save_estimator(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module, task: Task | None = None, curvature: Curvature | None = None
    ) -> "InfluenceEstimator":
        """Loads an estimator saved by :meth:`save`, checking that ``model`` is the fitted one.

        The file is untrusted input: it names its curvature's and task's classes, and they are
        rebuilt only when allowed (influence's own classes, or classes registered with
        :func:`influence.register_class`); nothing named in a file is imported or called
        otherwise. See ``docs/files_and_safety.md``.

        Args:
            task: used instead of the saved task; needed when that cannot be rebuilt (its
                class is not registered, or its arguments were not stored).
            curvature: an instance of a custom curvature class that is not registered, with the
                saved parameters (checked); the fitted state is loaded into a copy of it.

        Raises:
            ModelMismatchError: ``model`` differs (names the parameters that differ).
            StorageError: the file names a class that is not allowed, or is not an influence
                file; CorruptedFileError, FormatVersionError: see :mod:`influence.io`.
        """
        from .io import load_estimator

        return load_estimator(cls, path, model, task, curvature)
