"""Query aggregation: many queries scored as one, in one training pass and O(1) query memory.

``pairwise_scores(test_loader, aggregate_queries="mean")`` returns the ``(1, n_train)`` row

    s_j = q̄ᵀ ∇ℓ(z_j),    q̄ = (1/n) Σ_i (C + λI)⁻¹ ∇m(z_test_i) = (C + λI)⁻¹ (1/n) Σ_i ∇m(z_test_i)

(the preconditioner is linear, so this is also the preconditioned mean query gradient), which
equals the mean over the rows of the ``(n, n_train)`` matrix: "which training data made this
behaviour", for a behaviour shown by many prompts. ``"sum"`` drops the ``1/n``. Queries with
nothing measured count in ``n`` with a zero gradient, as their rows of the matrix are zero.

The query batches are preconditioned one at a time and added into **one** resident query,
accumulated in the promotion of the gradients' dtype and ``score_dtype``, so the memory does
not grow with the number of queries (``plan_["resident_query_bytes"]`` is one query's, whatever
``n``). Every hook layer holds that query dense (``"materialise"``): a sum of factored queries
(ghost factors, low-rank SVDs) grows in rank with ``n``, so ``strategy`` and ``query_rank``
do not apply; the projections (LoGra, TRAK) are linear and stay as configured.

Examples:
    >>> import torch
    >>> from influence import ClassificationTask, Exact, InfluenceEstimator
    >>> model = torch.nn.Linear(3, 2).double()
    >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0]))]
    >>> est = InfluenceEstimator(Exact(damping=0.1), ClassificationTask(), score_dtype=torch.float64).fit(model, data)
    >>> mean = est.pairwise_scores(data, aggregate_queries="mean")
    >>> mean.shape, torch.allclose(mean, est.pairwise_scores(data).mean(0, keepdim=True))
    (torch.Size([1, 6]), True)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ._loader import iterate_batches
from ._progress import timed, track

AGGREGATIONS = ("mean", "sum")


def check_aggregate(value: Any) -> str | None:
    """``None`` (no aggregation), ``"mean"`` or ``"sum"`` from ``aggregate_queries=...``."""
    if value is False or value is None:
        return None
    if value is True:
        return "mean"
    if isinstance(value, str) and value in AGGREGATIONS:
        return value
    raise ValueError(
        f"Invalid aggregate_queries {value!r}. Supported: False (one row per query), True or "
        f"'mean' (the mean of the queries), 'sum' (their sum)."
    )


def aggregated_query(scorer, test_loader: Iterable[Any], n_total: int) -> dict:
    """The resident form (``{layer: {part: (1, ...)}}``) of the mean (sum) of the preconditioned
    queries of ``test_loader``, built batch by batch; sets the scorer's plan."""
    from ._query_groups import _check_finite_block, _n

    total, dtypes, count = None, {}, 0
    for batch in track(iterate_batches(test_loader, "test_loader"), "test gradients", test_loader):
        with timed("influence_factors"):
            block = scorer.prepare_queries(batch, n_total, cast=False)
        _check_finite_block(block, count)
        count += _n(block)
        if total is None:
            dtypes = {(name, p): t.dtype for name, e in block.items() for p, t in e.items()}
            total = {name: {p: t.new_zeros((1, *t.shape[1:]), dtype=torch.promote_types(t.dtype, scorer.score_dtype))
                            for p, t in e.items()} for name, e in block.items()}
        for name, e in block.items():
            for p, t in e.items():
                total[name][p] += t.sum(0, keepdim=True, dtype=total[name][p].dtype)
        del block
    if count != n_total:
        raise RuntimeError(
            f"The test loader yielded {count} queries, but {n_total} were counted before: it must "
            "yield the same data on every pass."
        )
    scale = 1.0 / count if scorer.aggregate == "mean" else 1.0
    query = {name: {p: scorer._cast(t.mul_(scale).to(dtypes[name, p])) for p, t in e.items()} for name, e in total.items()}
    del total
    scorer._group_size(query, 1, 1)  # one query: its bytes, and max_memory must hold it
    scorer.plan.update(aggregate=scorer.aggregate, num_queries=n_total)
    return query
