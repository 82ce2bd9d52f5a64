"""``Diagonal``: the Fisher's diagonal, one value per parameter."""

from __future__ import annotations

from ._blocks import BlockCurvature, DiagonalBlock, coverage_report, index_of
from ._fisher import FisherSampling, fisher_diagonal_statistics, terms_per_example


class Diagonal(FisherSampling, BlockCurvature):
    """``C = diag(F)``, ``F`` the Fisher of the mean loss: ``d = (1/N) Σ_i ∇ℓ_i ⊙ ∇ℓ_i``.

    ``fisher_type="empirical"`` uses the data's labels (``d`` is the diagonal of
    ``Exact(curvature_type="fisher")``); ``"true"`` averages ``num_samples`` targets per example
    drawn from the model's predictive distribution (seeded by ``seed``); ``"expected"`` takes
    that expectation exactly (``d`` is the diagonal of ``Exact(curvature_type="ggn")``), from
    the square-root columns of the output Hessian, up to ``max_classes`` of them (else it
    samples, as for :class:`KFAC`). Per-example gradients come from
    :func:`~influence.gradients.per_sample_grads`, so any module is covered.
    ``solve(G) = G / (d + λ)``. Fitted: ``blocks_``, ``diagonal_``, ``coverage_``,
    ``fisher_plan_`` (as :class:`KFAC`'s), ``statistics_`` (sums and counts), ``num_examples_``.
    Fitting runs the statistics protocol (sharded and all-reduced under ``torch.distributed``,
    resumable with ``checkpoint_dir``); saving stores ``statistics_``.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> loader = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> cur = Diagonal(damping=1e-2, fisher_type="empirical").fit(model, ClassificationTask(), loader)
        >>> cur.diagonal_.shape
        torch.Size([8])
    """

    def __init__(
        self,
        damping: float = 1e-3,
        fisher_type: str = "true",
        num_samples: int = 1,
        seed: int = 0,
        chunk_size: int | None = None,
        max_classes: int = 100,
    ):
        super().__init__(damping=damping)
        self.fisher_type = fisher_type
        self.num_samples = num_samples
        self.seed = seed
        self.chunk_size = chunk_size
        self.max_classes = max_classes

    # Fitting runs the statistics protocol of Curvature (sharded, checkpointed, all-reduced).
    def _fit(self, model, task, loader, layout):
        self._plan_fisher(model, task, loader)
        super()._fit(model, task, loader, layout)

    def _batch_statistics(self, model, task, batch, layout, pass_index):
        options = self._fisher_options(model, task, batch, pass_index)
        total, count = fisher_diagonal_statistics(model, task, batch, layout, *options, chunk_size=self.chunk_size)
        return {"diagonal/sum": total, "diagonal/count": count}

    def _finalize(self, statistics, layout, pass_index):
        self._set_statistics(dict(statistics), layout)

    def _set_statistics(self, statistics, layout) -> None:
        total, count = statistics["diagonal/sum"], statistics["diagonal/count"]
        self.statistics_ = statistics
        self.diagonal_ = total / count.clamp_min(1)
        names = tuple(layout.names)
        self.blocks_ = [DiagonalBlock(names, index_of(layout, names), self.diagonal_)]
        self.coverage_ = coverage_report(layout, {n: "diagonal" for n in names})
        self.num_examples_ = int(count) // terms_per_example(self._computed_fisher(), self.num_samples)

    def _restore(self, statistics, layout, model) -> None:
        self._set_statistics(statistics, layout)
