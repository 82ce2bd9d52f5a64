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
- ``"expected"``: the true Fisher's expectation over ``ŷ`` taken **exactly**, i.e. the
  Gauss-Newton matrix ``(1/N) Σ_i J_iᵀ H_i J_i`` (``J_i`` the Jacobian of the outputs, ``H_i``
  the output Hessian of the loss). With a square root ``H_i = Σ_k u_ik u_ikᵀ``
  (:meth:`~influence.tasks.OutputTask.output_hessian_sqrt`; for softmax cross-entropy
  ``u_ic = √p_ic (e_c − p_i)``, ``C`` columns; for squared error the unit vectors) each
  example contributes the ``K`` gradients ``J_iᵀ u_ik``, **summed** (Martens & Grosse 2015;
  curvlinops' "type-2" K-FAC): K-FAC/EK-FAC/Diagonal statistics of the GGN without Monte-Carlo
  noise, deterministic, the same for any batching and number of processes (to rounding). Cost:
  ``K`` vector-Jacobian products per example instead of one, taken by batched backward passes
  (:data:`COLUMNS_PER_BACKWARD` columns at a time). When the task has no closed-form square
  root (language models: a sequence has ``(T − 1)·V`` columns) or ``K > max_classes``, the fit
  samples ``num_samples`` targets per example exactly as ``"true"`` does, warns
  (:class:`~influence.FallbackWarning`) and says so in ``fisher_plan_``.

Statistics are sums plus counts: for ``"true"`` every sample counts as one term
(``count = N · num_samples``, the mean over samples); for ``"expected"`` the ``K`` columns of an
example add up to its Gauss-Newton matrix and count once (``count = N``).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from .._loader import iterate_batches
from ..draws import TargetDraws
from ..exceptions import FallbackWarning, InfluenceError
from ..gradients.functional import per_sample_grads
from ..params import ParameterLayout
from ..tasks import OutputTask, Task

FISHER_TYPES = ("true", "empirical", "expected")

#: Square-root columns back-propagated together in one batched backward pass (``fisher_type=
#: "expected"``): its memory is at most this many times an ordinary backward's.
COLUMNS_PER_BACKWARD = 16


def check_fisher_options(owner: str, fisher_type: Any, num_samples: Any, task: Task, max_classes: Any) -> None:
    """Validates ``fisher_type``, ``num_samples`` and ``max_classes`` against the task."""
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"{owner}: invalid fisher_type {fisher_type!r}. Supported: {FISHER_TYPES}.")
    for name, value in (("num_samples", num_samples), ("max_classes", max_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be an integer >= 1; got {value!r}.")
    if fisher_type != "empirical" and not isinstance(task, OutputTask):
        raise InfluenceError(
            f"{owner}(fisher_type={fisher_type!r}) takes targets from the model's predictive "
            "distribution and needs an OutputTask (ClassificationTask, RegressionTask, "
            f"LanguageModelingTask); {type(task).__name__} is not one. Use "
            "fisher_type='empirical' or subclass OutputTask."
        )


def _check_sampler(task: OutputTask) -> None:
    if "generator" in inspect.signature(task.sample_targets).parameters:
        raise InfluenceError(
            f"{type(task).__name__}.sample_targets(outputs, batch, generator) has the signature of "
            "an earlier influence's OutputTask. It is now sample_targets(outputs, batch, draws): take "
            "the random numbers from draws (an influence.draws.TargetDraws keyed by each "
            "example's global index), e.g. sample_categorical(logits, draws.uniform(shape)) or "
            "draws.normal(shape) instead of torch.rand/randn(..., generator=generator)."
        )


class FisherSampling:
    """Mixin of the Fisher curvatures (``fisher_type``, ``num_samples``, ``seed``,
    ``max_classes``): what a batch's statistics back-propagate. Put it before the
    :class:`Curvature` base.

    ``fisher_plan_`` (fitted, saved with the curvature) states what the fit computed:
    ``{"requested": fisher_type, "computed": ...}`` plus ``"columns"`` (square-root columns per
    example, ``"expected"``), ``"num_samples"`` (``"true"``) and ``"reason"`` when ``"expected"``
    fell back to sampling.
    """

    fisher_type: str
    num_samples: int
    seed: int
    max_classes: int

    def _plan_fisher(self, model: nn.Module, task: Task, loader: Any, batch: Any = None) -> None:
        """Validates the options and sets ``fisher_plan_``. ``"expected"`` reads the number of
        square-root columns from the outputs of the loader's first batch (``batch`` when given)."""
        owner = type(self).__name__
        check_fisher_options(owner, self.fisher_type, self.num_samples, task, self.max_classes)
        plan: dict[str, Any] = {"requested": self.fisher_type, "computed": self.fisher_type}
        if self.fisher_type == "expected":
            if batch is None:
                batch = next(iterate_batches(loader, "train_loader"))
            with torch.no_grad():
                columns = task.num_output_hessian_columns(task.forward(model, batch), batch)
            if columns is not None and columns <= self.max_classes:
                plan["columns"] = int(columns)
            else:
                if columns is None:
                    reason = f"{type(task).__name__} has no closed-form square root of its output Hessian"
                else:
                    reason = f"its output Hessian has {columns} square-root columns, more than max_classes={self.max_classes}"
                plan.update(computed="true", reason=reason)
                warnings.warn(
                    f"{owner}(fisher_type='expected'): {reason}, so the fit samples "
                    f"num_samples={self.num_samples} target(s) per example as fisher_type='true' "
                    "does (raise max_classes, or implement OutputTask.output_hessian_sqrt, for the "
                    "exact expectation). See fisher_plan_.",
                    FallbackWarning,
                    stacklevel=4,
                )
        if plan["computed"] == "true":
            plan["num_samples"] = self.num_samples
            _check_sampler(task)
        self.fisher_plan_ = plan

    def _computed_fisher(self) -> str:
        plan = getattr(self, "fisher_plan_", None)  # absent in files saved before it existed
        return plan["computed"] if plan else self.fisher_type

    def _draws_per_example(self) -> bool:
        return self._computed_fisher() == "true"

    def _fisher_options(self, model: nn.Module, task: Task, batch: Any, pass_index: int):
        """``(fisher_type, num_samples, draws)`` for one batch of the fit, ``fisher_type`` the
        computed one: ``draws`` keyed by the global indices of the batch's examples (from
        ``_example_offset``, set by the fit driver's ``_begin_batch``) and the pass; ``None``
        unless targets are sampled."""
        fisher_type, draws = self._computed_fisher(), None
        if fisher_type == "true":
            device = next(model.parameters()).device
            index = torch.arange(task.num_examples(batch), device=device) + self._example_offset
            draws = TargetDraws(self.seed, index, stream=(pass_index,))
        return fisher_type, self.num_samples, draws

    # fisher_plan_ is saved beside the statistics (BlockCurvature saves statistics_ only)
    def _state_metadata(self) -> dict[str, Any]:
        return {**super()._state_metadata(), "fisher_plan_": self.fisher_plan_}

    def _load_state(self, tensors, metadata, layout, model) -> None:
        plan = metadata.get("fisher_plan_")
        if plan is not None:  # the file is untrusted: a dict of the known keys and plain values
            keys = {"requested", "computed", "columns", "num_samples", "reason"}
            if not (isinstance(plan, dict) and set(plan) <= keys and plan.get("computed") in FISHER_TYPES
                    and all(isinstance(v, (str, int)) for v in plan.values())):
                raise ValueError(f"the saved fisher_plan_ is malformed: {plan!r:.200}")
            self.fisher_plan_ = dict(plan)
        super()._load_state(tensors, metadata, layout, model)


def terms_per_example(fisher_type: str, num_samples: int) -> int:
    """How many times an example counts in the statistics: ``num_samples`` for the sampled
    (``"true"``) Fisher (a mean over samples), 1 otherwise (``"expected"`` sums its columns)."""
    return num_samples if fisher_type == "true" else 1


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


def fisher_backward(cap, model: nn.Module, task: Task, batch: Any, fisher_type: str, num_samples: int,
                    draws: TargetDraws | None) -> Iterator[None]:
    """One forward of ``batch`` under the :class:`~influence.gradients.capture.LayerCapture`
    ``cap``, then backward passes; yields after each, with ``cap.output_grads`` holding
    ``(m·B, T, d_out)`` output gradients of ``m`` terms per example (``m = 1`` per sampled loss;
    up to :data:`COLUMNS_PER_BACKWARD` square-root columns for ``"expected"``).

    Summing ``s sᵀ`` over everything yielded gives the Fisher's output-gradient statistics of
    the batch (divide by ``B · terms_per_example`` for the mean).
    """
    if fisher_type == "expected":
        outputs = task.forward(model, batch)
        chunks = task.output_hessian_sqrt(outputs.detach(), batch).split(COLUMNS_PER_BACKWARD)
        for i, chunk in enumerate(chunks):
            cap.backward(outputs, retain_graph=i < len(chunks) - 1, grad_outputs=chunk)
            yield
        return
    losses = fisher_losses(model, task, batch, fisher_type, num_samples, draws)
    for k, loss in enumerate(losses):
        cap.backward(loss, retain_graph=k < len(losses) - 1)
        yield


class _SampledTargets(Task):
    """Loss at given targets: batches are ``(original_batch, targets)``, for torch.func."""

    def __init__(self, task: OutputTask):
        self.task = task

    def loss(self, model, batch):
        inner, targets = batch
        return self.task.output_loss(self.task.forward(model, inner), targets, inner)

    def num_examples(self, batch):
        return self.task.num_examples(batch[0])


class _ProjectedOutputs(_SampledTargets):
    """``⟨f(x_b), u_b⟩`` for batches ``(original_batch, u)``: its gradient is ``J_bᵀ u_b``."""

    def loss(self, model, batch):
        inner, u = batch
        outputs = self.task.forward(model, inner)
        return (outputs * u).reshape(outputs.shape[0], -1).sum(-1)


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
    """``(Σ_i Σ_terms ∇ℓ_i ⊙ ∇ℓ_i, count)`` over one batch and ``layout``'s parameters, float64.

    The Fisher diagonal is the sums over all batches divided by the count; per-example
    gradients come from :func:`~influence.gradients.per_sample_grads` restricted to ``layout``
    (one chunk at a time): of the loss (``"empirical"``), of the loss at each sampled target
    (``"true"``) or of ``⟨f(x_i), u_ik⟩`` for each square-root column (``"expected"``).
    """
    device = next(model.parameters()).device
    total = torch.zeros(layout.num_params, dtype=torch.float64, device=device)
    if fisher_type == "empirical":
        terms = [(task, batch)]
    else:
        with torch.no_grad():
            outputs = task.forward(model, batch)
        if fisher_type == "expected":
            wrapper = _ProjectedOutputs(task)
            terms = [(wrapper, (batch, u)) for u in task.output_hessian_sqrt(outputs, batch)]
        else:
            wrapper = _SampledTargets(task)
            terms = [
                (wrapper, (batch, task.sample_targets(outputs, batch, draws.substream(k))))
                for k in range(num_samples)
            ]
    n = task.num_examples(batch)
    for term_task, term_batch in terms:
        G = per_sample_grads(model, term_task, term_batch, layout, chunk_size=chunk_size)
        total += G.double().pow(2).sum(0).to(device)
    count = torch.tensor(float(n * terms_per_example(fisher_type, num_samples)), dtype=torch.float64, device=device)
    return total, count
