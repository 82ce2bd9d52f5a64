"""``KFAC`` and ``EKFAC``: Kronecker-factored Fisher blocks, every parameter covered."""

from __future__ import annotations

from typing import Mapping

import torch

from ..exceptions import InfluenceError
from .._loader import iterate_batches
from .._progress import current
from ..gradients.capture import hookable_layers
from ..gradients.plan import plan_layers
from ..gradients.functional import check_vmappable_modes
from ..params import ParameterLayout
from ._blocks import (
    BlockCurvature,
    DiagonalBlock,
    IdentityBlock,
    coverage_report,
    index_of,
    resolve_fallback,
    warn_fallback,
)
from ._fisher import FisherSampling, fisher_diagonal_statistics
from ._kronecker import correction_statistics, factor_statistics, kronecker_blocks


class KFAC(FisherSampling, BlockCurvature):
    """K-FAC: per layer ``F_l ≈ S ⊗ A`` (Martens & Grosse 2015; Grosse & Martens 2016 for conv).

    ``nn.Linear`` (bias as a homogeneous input coordinate, leading dimensions as tokens),
    ``nn.Conv2d`` (unfolded patches), ``nn.Embedding`` (diagonal ``A``) and HuggingFace
    ``Conv1D`` (GPT-2; weight stored ``(d_in, d_out)``) get one Kronecker block each, with ``A`` the per-token mean of input outer products and ``S`` the per-example mean of
    token-summed output-gradient outer products (exact normalisation in
    :mod:`influence.curvature._kronecker`), so that ``S ⊗ A`` approximates the layer's block of the
    Fisher of the **mean** loss ``F = (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` (``fisher_type``: ``"true"`` samples
    targets from the model, ``"empirical"`` uses the labels, ``"expected"`` takes the true
    Fisher's expectation over the targets exactly, i.e. the Gauss-Newton matrix, from ``C``
    back-propagated square-root columns of the output Hessian per example; see
    :mod:`influence.curvature._fisher`). With eigendecompositions ``A = Q_A diag(λ_A) Q_Aᵀ`` and
    ``S = Q_S diag(λ_S) Q_Sᵀ`` (float64)::

        (F_l + λI)⁻¹ vec(X) = vec(Q_S [(Q_Sᵀ X Q_A) / (λ_S λ_Aᵀ + λ)] Q_Aᵀ)

    applied to all rows at once. Every other attributed parameter (LayerNorm, a layer whose bias
    is frozen, custom modules, grouped convolutions) falls back to a per-parameter Fisher
    diagonal or to the identity (``fallback``: ``"diagonal"``, ``"identity"``, or
    ``{glob pattern: method}`` matched against parameter and module names, unmatched →
    ``"diagonal"``); one :class:`~influence.FallbackWarning` lists them. Blocks are not coupled.

    Args:
        damping: ``λ``, absolute, added at solve time.
        fisher_type: ``"true"`` (sampled targets), ``"empirical"`` (labels) or ``"expected"``
            (the exact expectation over the targets: the Gauss-Newton matrix's statistics
            without sampling noise, deterministic; ``C`` vector-Jacobian products per example
            instead of one).
        num_samples: sampled targets per example for ``"true"`` (and ``"expected"`` where it
            falls back to sampling).
        seed: keys the sampled targets, with each example's global index (reproducible fits, the
            same for any batch size and number of processes).
        fallback: how parameters outside supported layers are covered.
        chunk_size: examples per vmap chunk for the diagonal fallback's per-example gradients.
        max_classes: ``"expected"`` takes the exact expectation when the output Hessian has at
            most this many square-root columns (classes; output coordinates for regression),
            else, and for language models, samples ``num_samples`` targets with a
            :class:`~influence.FallbackWarning` (``fisher_plan_`` says which).

    Fitted attributes: ``blocks_``, ``coverage_`` (``{module: {"method", "parameters",
    "num_params"}}``, every parameter once), ``fisher_plan_`` (what the statistics
    back-propagated: ``{"requested", "computed", "columns" | "num_samples", "reason"}``),
    ``statistics_`` (float64 **sums and counts**, see :meth:`merge_statistics`),
    ``num_examples_``.

    Fitting runs the statistics protocol of :class:`~influence.curvature.Curvature`: under
    ``torch.distributed`` each rank sums the statistics of its shard and one all-reduce
    combines them; ``checkpoint_dir`` makes the fit resumable. Saving stores ``statistics_``;
    loading rebuilds the blocks from it and the model.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> loader = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> cur = KFAC(damping=1e-2).fit(model.double(), ClassificationTask(),
        ...                              [(x.double(), y) for x, y in loader])
        >>> sorted(entry["method"] for entry in cur.coverage_.values())
        ['kronecker', 'kronecker']
        >>> V = torch.randn(2, 26, dtype=torch.float64)
        >>> torch.allclose(cur.solve(cur.matmat(V)), V)
        True
    """

    def __init__(
        self,
        damping: float = 1e-3,
        fisher_type: str = "true",
        num_samples: int = 1,
        seed: int = 0,
        fallback: str | Mapping[str, str] = "diagonal",
        chunk_size: int | None = None,
        max_classes: int = 100,
    ):
        super().__init__(damping=damping)
        self.fisher_type = fisher_type
        self.num_samples = num_samples
        self.seed = seed
        self.fallback = fallback
        self.chunk_size = chunk_size
        self.max_classes = max_classes

    # ------------------------------------------------------------------------------ fitting
    # Fitting runs the statistics protocol of Curvature (sharded across torch.distributed
    # ranks, checkpointed, all-reduced): pass 0 sums the Kronecker factors and the fallback
    # diagonal; EKFAC adds pass 1, the eigenvalue corrections in pass 0's eigenbasis.
    def _fit(self, model, task, loader, layout):
        owner = type(self).__name__
        check_vmappable_modes(model)
        # the full loader's first batch, on every rank alike (the plans decide the statistics'
        # keys and the Fisher's terms, which must agree across ranks), read at most once and
        # only when needed: the estimator has usually planned the layers already
        read: list = []

        def first():
            if not read:
                read.append(next(iterate_batches(loader, "train_loader")))
            return read[0]

        self._plan_fisher(model, task, loader, first() if self.fisher_type == "expected" else None)
        self._plan(model, layout, task=task, batch=first)
        super()._fit(model, task, loader, layout)
        warn_fallback(owner, model, self.coverage_, self._reasons)

    def _batch_statistics(self, model, task, batch, layout, pass_index):
        options = self._fisher_options(model, task, batch, pass_index)
        stats = factor_statistics(model, task, batch, self._layers, *options)
        diagonal = [n for n in layout.names if self._methods[n] == "diagonal"]
        if diagonal:
            stats["diagonal/sum"], stats["diagonal/count"] = fisher_diagonal_statistics(
                model, task, batch, _sub_layout(layout, diagonal), *options, chunk_size=self.chunk_size
            )
        device = next(model.parameters()).device
        stats["num_examples"] = torch.tensor(float(task.num_examples(batch)), dtype=torch.float64, device=device)
        return stats

    def _finalize(self, statistics, layout, pass_index):
        self._set_statistics(dict(statistics))

    def _set_statistics(self, statistics: dict[str, torch.Tensor]) -> None:
        """Fitted state from summed statistics: ``statistics_``, ``blocks_``, ``num_examples_``."""
        self.statistics_ = statistics
        self.blocks_ = self._build(statistics)
        self.num_examples_ = int(statistics["num_examples"])

    def _restore(self, statistics, layout, model) -> None:
        self._plan(model, layout, statistics=statistics)  # the fit's layers: those with factors
        self._set_statistics(statistics)

    def _plan(self, model, layout, task=None, batch=None, statistics=None) -> None:
        """Which layers get Kronecker blocks and how the rest falls back.

        At fit, the candidates (Linear/Conv2d/Embedding/HF Conv1D) go through
        :func:`~influence.gradients.plan.plan_layers` on the first batch: a layer whose weight
        is also used outside it (tied or functional use), whose batch axis cannot be traced or
        that fails the self-check gets the fallback instead, with the reason in ``coverage_``;
        so does a weight tied to several layers (its per-example gradients are summed on the
        hook path, but no single layer's factors describe it).
        On load, the layers are those with saved factors (``statistics``).

        Sets ``_layers``, ``_methods`` (parameter → method), ``_layout``, ``_reasons`` and
        ``coverage_``; with ``statistics_``, this is all :meth:`_build` needs.
        """
        candidates = {n: i for n, i in hookable_layers(model, layout).items() if i.kind != "layernorm"}
        if statistics is not None:
            layers = {n: i for n, i in candidates.items() if f"{n}/A" in statistics}
            self._reasons = {}
        else:
            plan = plan_layers(model, task, layout, hookable_layers(model, layout), batch, current().self_check)
            layers = {n: i for n, i in plan.layers.items() if n in candidates}
            self._reasons = {n: why for n, why in plan.rejected.items() if n in candidates}
            self._reasons.update(_tie_reasons(plan))
        covered = {n for info in layers.values() for n in (info.weight, info.bias) if n}
        rest = [n for n in layout.names if n not in covered]
        methods = {n: "kronecker" for n in covered}
        methods.update(resolve_fallback(type(self).__name__, self.fallback, rest))
        self._layers, self._methods, self._layout = layers, methods, layout
        self.coverage_ = coverage_report(layout, methods, self._reasons)

    def _build(self, stats: Mapping[str, torch.Tensor]) -> list:
        """Blocks from summed statistics: Kronecker, then diagonal and identity fallbacks."""
        layout, methods = self._layout, self._methods
        blocks = kronecker_blocks(stats, self._layers, layout)
        blocks = [self._eigenvalues(block, stats) for block in blocks]
        diagonal = [n for n in layout.names if methods[n] == "diagonal"]
        identity = [n for n in layout.names if methods[n] == "identity"]
        if diagonal:
            d = stats["diagonal/sum"] / stats["diagonal/count"].clamp_min(1)
            blocks.append(DiagonalBlock(tuple(diagonal), index_of(layout, diagonal), d))
        if identity:
            blocks.append(IdentityBlock(tuple(identity), index_of(layout, identity)))
        return blocks

    def _eigenvalues(self, block, stats):
        """K-FAC keeps ``λ_S λ_Aᵀ``; EK-FAC replaces them."""
        return block

    # ------------------------------------------------------------------------------ statistics
    def merge_statistics(self, statistics: Mapping[str, torch.Tensor]) -> "KFAC":
        """Adds another process's (or data shard's) ``statistics_`` and rebuilds the blocks.

        ``statistics_`` holds float64 **sums and counts** only, so distributed fitting is: fit
        on each shard, all-reduce (sum) every tensor of ``statistics_`` (or call this method with
        the other shards' dicts), and rebuild. Means, eigendecompositions and damping come
        after the sum, so the result equals a fit on the union of the shards.

        Raises:
            ValueError: when the keys differ (statistics of another model or configuration).
        """
        if getattr(self, "statistics_", None) is None:
            raise InfluenceError(
                f"This {type(self).__name__} is not fitted yet: call fit(...) before "
                "merge_statistics()."
            )
        if set(statistics) != set(self.statistics_):
            diff = sorted(set(statistics) ^ set(self.statistics_))
            raise ValueError(
                f"merge_statistics: the statistics do not match this fit (keys differ: {diff[:6]}). "
                "Merge statistics of the same model, parameters and curvature settings."
            )
        self._set_statistics({k: v + statistics[k].to(v) for k, v in self.statistics_.items()})
        return self


def _tie_reasons(plan) -> dict[str, str]:
    """Why each member of a tie (:attr:`~influence.gradients.plan.LayerPlan.ties`) falls back."""
    reasons = {}
    for members in plan.ties.values():
        for info in members:
            others = ", ".join(f"{o.name or '<root>'} ({type(o.module).__name__})" for o in members if o is not info)
            reasons[info.name] = (
                f"weight tied with {others}: per-example gradients summed on the hook path; no "
                "Kronecker block for a tied weight"
            )
    return reasons


class EKFAC(KFAC):
    """EK-FAC (George et al. 2018): K-FAC's eigenbasis with corrected eigenvalues.

    Same blocks, fallbacks and arguments as :class:`KFAC`; a second pass over the training data
    replaces the Kronecker eigenvalues ``λ_S λ_Aᵀ`` by the second moments of the per-example
    gradients in the Kronecker eigenbasis::

        Λ = (1/N) Σ_i (Q_Sᵀ G_i Q_A)²      (elementwise square; G_i = Σ_t s_t a_tᵀ)

    computed per layer from the captured ``a`` and ``s`` (no flat per-example gradients). ``Λ``
    is the Frobenius-optimal diagonal in that basis, so each block is at least as close to the
    Fisher as K-FAC's. The correction sums are kept in ``statistics_``
    (``"<layer>/corrections"``, ``"<layer>/corrections_count"``). They are pass 1 of the
    statistics protocol, in the eigenbasis of pass 0 (K-FAC's factors, already all-reduced
    across processes, hence the same basis on every rank); then they are all-reduced too.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> loader = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> cur = EKFAC(damping=1e-2, fisher_type="empirical").fit(model, ClassificationTask(), loader)
        >>> cur.blocks_[0].eigenvalues.shape
        torch.Size([2, 4])
    """

    _num_passes = 2

    def _batch_statistics(self, model, task, batch, layout, pass_index):
        if pass_index == 0:
            return super()._batch_statistics(model, task, batch, layout, pass_index)
        kron = [b for b in self.blocks_ if b.method == "kronecker"]
        options = self._fisher_options(model, task, batch, pass_index)
        stats = correction_statistics(model, task, batch, kron, *options) if kron else {}
        device = next(model.parameters()).device
        stats["num_examples"] = torch.tensor(float(task.num_examples(batch)), dtype=torch.float64, device=device)
        return stats

    def _finalize(self, statistics, layout, pass_index):
        if pass_index == 0:
            return super()._finalize(statistics, layout, pass_index)
        statistics = dict(statistics)
        del statistics["num_examples"]  # pass 0's count stays
        # the corrections were measured in pass 0's eigenbases: keep them (rebuilding would
        # redo every eigendecomposition and give the same bases); only the eigenvalues change
        self.statistics_ = {**self.statistics_, **statistics}
        self.blocks_ = [self._eigenvalues(b, self.statistics_) if b.method == "kronecker" else b for b in self.blocks_]

    def _eigenvalues(self, block, stats):
        key = f"{block.info.name}/corrections"
        if key in stats:
            block.eigenvalues = stats[key] / stats[f"{key}_count"].clamp_min(1)
        return block


def _sub_layout(layout: ParameterLayout, names: list[str]) -> ParameterLayout:
    shapes = dict(zip(layout.names, layout.shapes))
    return ParameterLayout(tuple(names), tuple(shapes[n] for n in names))
