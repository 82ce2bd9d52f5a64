"""Fisher types shared by the Fisher-based curvatures (``KFAC``, ``EKFAC``, ``Diagonal``).

For per-example losses ``ℓ(z) = L(f(x), y)`` the Fisher of the **mean** training loss is
``F = (1/N) Σ_i E_ŷ[∇ℓ(x_i, ŷ) ∇ℓ(x_i, ŷ)ᵀ]`` where ``ŷ`` is, for ``fisher_type``:

- ``"empirical"``: the data's labels (one "sample", the task's own loss); the dense reference is
  ``Exact(curvature_type="fisher")``;
- ``"true"``: targets drawn from the model's predictive distribution by
  :meth:`~influence.tasks.OutputTask.sample_targets` (per token for language models),
  ``num_samples`` draws per example, averaged. Its expectation is ``Exact(curvature_type="ggn")``
  for cross-entropy and squared error. The random numbers are keyed, not streamed
  (:class:`~influence.draws.TargetDraws`): sample ``k`` of the example at global index ``i`` in
  pass ``p`` (EK-FAC's second pass draws anew) uses the numbers keyed
  ``(seed, (p, k), i, position)``, so a fit is reproducible and does not depend on the batch
  size, the number of processes or where a resumed fit restarted (to float rounding). Within
  a pass, every statistic of an example (K-FAC's factors and the diagonal fallback) sees the
  same targets.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..draws import TargetDraws
from ..exceptions import InfluenceError
from ..gradients.functional import per_sample_grads
from ..params import ParameterLayout
from ..tasks import OutputTask, Task

FISHER_TYPES = ("true", "empirical")


def check_fisher_options(owner: str, fisher_type: Any, num_samples: Any, task: Task) -> None:
    """Validates ``fisher_type`` and ``num_samples`` against the task."""
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"{owner}: invalid fisher_type {fisher_type!r}. Supported: {FISHER_TYPES}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{owner}: num_samples must be an integer >= 1; got {num_samples!r}.")
    if fisher_type == "true" and not isinstance(task, OutputTask):
        raise InfluenceError(
            f"{owner}(fisher_type='true') samples targets from the model's predictive "
            f"distribution and needs an OutputTask (ClassificationTask, RegressionTask, "
            f"LanguageModelingTask); {type(task).__name__} is not one. Use "
            "fisher_type='empirical' or subclass OutputTask."
        )
    if fisher_type == "true" and "generator" in inspect.signature(task.sample_targets).parameters:
        raise InfluenceError(
            f"{type(task).__name__}.sample_targets(outputs, batch, generator) has the signature of "
            "an earlier influence's OutputTask. It is now sample_targets(outputs, batch, draws): take "
            "the random numbers from draws (an influence.draws.TargetDraws keyed by each "
            "example's global index), e.g. sample_categorical(logits, draws.uniform(shape)) or "
            "draws.normal(shape) instead of torch.rand/randn(..., generator=generator)."
        )


class FisherSampling:
    """Mixin of the Fisher curvatures (``fisher_type``, ``num_samples``, ``seed``): the targets
    a batch's statistics use. Put it before the :class:`Curvature` base."""

    fisher_type: str
    num_samples: int
    seed: int

    def _draws_per_example(self) -> bool:
        return self.fisher_type == "true"

    def _fisher_options(self, model: nn.Module, task: Task, batch: Any, pass_index: int):
        """``(fisher_type, num_samples, draws)`` for one batch of the fit: ``draws`` keyed by the
        global indices of the batch's examples (from ``_example_offset``, set by the fit
        driver's ``_begin_batch``) and the pass; ``None`` for the empirical Fisher."""
        draws = None
        if self.fisher_type == "true":
            device = next(model.parameters()).device
            index = torch.arange(task.num_examples(batch), device=device) + self._example_offset
            draws = TargetDraws(self.seed, index, stream=(pass_index,))
        return self.fisher_type, self.num_samples, draws


def fisher_losses(
    model: nn.Module,
    task: Task,
    batch: Any,
    fisher_type: str,
    num_samples: int,
    draws: TargetDraws | None,
) -> list[torch.Tensor]:
    """Per-example losses ``(B,)`` whose gradients' outer products average to the Fisher.

    One forward pass; ``"empirical"`` gives ``[task.loss]``, ``"true"`` gives ``num_samples``
    losses at targets sampled with ``draws.substream(k)``, all sharing that forward's graph.
    """
    if fisher_type == "empirical":
        return [task.loss(model, batch)]
    outputs = task.forward(model, batch)
    return [
        task.output_loss(outputs, task.sample_targets(outputs, batch, draws.substream(k)), batch)
        for k in range(num_samples)
    ]


class _SampledTargets(Task):
    """Loss at given targets: batches are ``(original_batch, targets)``, for torch.func."""

    def __init__(self, task: OutputTask):
        self.task = task

    def loss(self, model, batch):
        inner, targets = batch
        return self.task.output_loss(self.task.forward(model, inner), targets, inner)

    def num_examples(self, batch):
        return self.task.num_examples(batch[0])


def fisher_diagonal_statistics(
    model: nn.Module,
    task: Task,
    batch: Any,
    layout: ParameterLayout,
    fisher_type: str,
    num_samples: int,
    draws: TargetDraws | None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_i Σ_samples ∇ℓ_i ⊙ ∇ℓ_i, count)`` over one batch and ``layout``'s parameters, float64.

    The Fisher diagonal is the sums over all batches divided by the count; per-example
    gradients come from :func:`~influence.gradients.per_sample_grads` restricted to ``layout``
    (one chunk at a time).
    """
    device = next(model.parameters()).device
    total = torch.zeros(layout.num_params, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    if fisher_type == "empirical":
        samples = [(task, batch)]
    else:
        with torch.no_grad():
            outputs = task.forward(model, batch)
        wrapper = _SampledTargets(task)
        samples = [
            (wrapper, (batch, task.sample_targets(outputs, batch, draws.substream(k))))
            for k in range(num_samples)
        ]
    for draw_task, draw_batch in samples:
        G = per_sample_grads(model, draw_task, draw_batch, layout, chunk_size=chunk_size)
        total += G.double().pow(2).sum(0).to(device)
        count += G.shape[0]
    return total, count
