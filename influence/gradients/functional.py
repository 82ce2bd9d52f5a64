"""Per-example gradients of any torch module through ``torch.func``.

``per_sample_grads`` returns ``G[b] = ∇_θ f(z_b)`` flattened by the :class:`ParameterLayout`,
where ``f`` is the task's loss (``objective="loss"``) or measurement. The hot path is
``vmap(grad(functional_call))``: each example is presented to the task as a batch of one, so
results never depend on how the loader batches. Where vmap cannot run the model (data-dependent
control flow, in-place updates of buffers, ...) the computation falls back to a loop over
examples, once per model, with a :class:`FallbackWarning` naming the module that failed, the
reason and the fix. Operations that vmap runs without a batching rule (slowly, one example at a
time) are reported once per model and operation, in place of torch's per-call warnings.
BatchNorm in training mode is refused: its batch statistics mix examples, so a per-example
gradient is not defined (call ``model.eval()``).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..exceptions import BatchFormatError, FallbackWarning, InfluenceError
from ..params import ParameterLayout, ParamSpec, select_parameters
from ..tasks import Task
from ._transforms import batching_rule_warnings, explain_failure

OBJECTIVES = ("loss", "measurement")
OUTSIDE_MODULES = "<the task's own code, outside any module>"  # what _failing_module names then

# Models on which vmap failed once: they go straight to the loop afterwards.
_LOOP_MODELS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


class _TaskCall(nn.Module):
    """Lets ``functional_call`` swap the model's parameters while the task calls the model."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.model, batch)


def check_vmappable_modes(model: nn.Module) -> None:
    """Raises when a module makes per-example gradients ill-defined (BatchNorm in training)."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training:
            raise InfluenceError(
                f"Module {name!r} ({type(module).__name__}) is in training mode: its batch "
                "statistics mix the examples of a batch, so per-example gradients are not "
                "defined. Call model.eval() before fitting or scoring."
            )


def task_objective(task: Task, objective: str) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``task.loss`` or ``task.measurement``, validated."""
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective {objective!r}. Supported: {OBJECTIVES}.")
    return task.loss if objective == "loss" else task.measurement


def check_per_example(losses: Any, n: int, task: Task) -> torch.Tensor:
    """Returns ``losses`` if it holds one value per example (shape ``(n,)``), else raises."""
    if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise InfluenceError(
            f"{type(task).__name__} must return one value per example, shape ({n},), with no "
            f"reduction over the batch; got {shape}."
        )
    return losses


def _check_output(out: Any, task: Task) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InfluenceError(
            f"{type(task).__name__} must return one value per example, shape (B,), with no "
            f"reduction over the batch; for a batch of one it returned {shape}."
        )
    return out[0]


class _PerExample:
    """Holds one model/task/layout combination and computes per-example gradients."""

    def __init__(self, model: nn.Module, task: Task, layout: ParameterLayout, objective: str):
        self.model = model
        self.task = task
        self.layout = layout
        self.bound = _TaskCall(model, task_objective(task, objective))
        self.prefixed = ["model." + n for n in layout.names]

    def _value(self, params: dict[str, torch.Tensor], batch_of_one: Any) -> torch.Tensor:
        swapped = dict(zip(self.prefixed, params.values()))
        out = functional_call(self.bound, swapped, (batch_of_one,), strict=False)
        return _check_output(out, self.task)

    def vmapped(self, params, leaves, spec, batched, chunk_size):
        def one(p, *example_leaves):
            rebuilt = [
                leaf.unsqueeze(0) if is_b else leaf
                for leaf, is_b in zip(example_leaves, batched)
            ]
            return self._value(p, tree_unflatten(rebuilt, spec))

        in_dims = (None, *[0 if b else None for b in batched])
        with torch.no_grad():  # torch.func still differentiates; no graph to other parameters
            return vmap(grad(one), in_dims=in_dims, randomness="different", chunk_size=chunk_size)(
                params, *leaves
            )

    def looped(self, params, leaves, spec, batched, n):
        per_name: dict[str, list[torch.Tensor]] = {k: [] for k in params}
        for i in range(n):  # plain autograd: works where function transforms cannot
            example = [leaf[i : i + 1] if b else leaf for leaf, b in zip(leaves, batched)]
            live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            with torch.enable_grad():  # also when a caller runs under no_grad
                value = self._value(live, tree_unflatten(example, spec))
                grads = torch.autograd.grad(value, list(live.values()), allow_unused=True)
            for (k, v), g in zip(live.items(), grads):
                per_name[k].append(torch.zeros_like(v) if g is None else g)
        return {k: torch.stack(v) for k, v in per_name.items()}


def split_batch(task: Task, batch: Any) -> tuple[list, Any, list[bool], int]:
    """Flattens a batch into leaves, marking the tensors that carry the batch dimension."""
    n = task.num_examples(batch)
    leaves, spec = tree_flatten(batch)
    batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n for x in leaves]
    if not any(batched):
        raise BatchFormatError(
            f"No tensor in the batch has the batch size {n} as its leading dimension."
        )
    return leaves, spec, batched, n


def take_examples(task: Task, batch: Any, index: torch.Tensor) -> Any:
    """The examples ``index`` of ``batch`` (repeats allowed), as a batch of the same structure."""
    leaves, spec, batched, _ = split_batch(task, batch)
    picked = [leaf[index.to(leaf.device)] if b else leaf for leaf, b in zip(leaves, batched)]
    return tree_unflatten(picked, spec)


def _failing_module(model: nn.Module, attempt: Callable[[], Any]) -> str:
    """Reruns a failing ``attempt`` with hooks that record the innermost module running."""
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() if stack else None))
    try:
        attempt()
    except Exception:
        pass
    finally:
        for h in handles:
            h.remove()
    if not stack:
        return OUTSIDE_MODULES
    name = stack[-1]
    return f"{name or '<root>'} ({type(model.get_submodule(name)).__name__})"


def per_sample_grads(
    model: nn.Module,
    task: Task,
    batch: Any,
    params: ParamSpec = "trainable",
    chunk_size: int | None = None,
    objective: str = "loss",
) -> torch.Tensor:
    """Per-example gradients ``(B, P)`` of the task's loss (or measurement) for one batch.

    Args:
        model: any ``nn.Module``; its parameters are not modified and no ``.grad`` is written.
        task: reads the batch (see :mod:`influence.tasks`).
        batch: one batch as the loader yields it.
        params: which parameters (see :func:`influence.params.select_parameters`).
        chunk_size: examples per vmap chunk (bounds memory); ``None`` for the whole batch.
        objective: ``"loss"`` (training examples) or ``"measurement"`` (queries).

    Returns:
        ``G`` of shape ``(B, P)`` in the parameters' dtype, ``G[b] = ∇θ f(z_b)``.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask
        >>> model = torch.nn.Linear(3, 2)
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> per_sample_grads(model, ClassificationTask(), batch).shape
        torch.Size([4, 8])
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")
    layout = select_parameters(model, params)
    check_vmappable_modes(model)
    engine = _PerExample(model, task, layout, objective)
    tensors = {n: t.detach() for n, t in layout.tensors(model).items()}
    leaves, spec, batched, n = split_batch(task, batch)

    if model not in _LOOP_MODELS:
        try:
            with batching_rule_warnings(model, "per-example gradients"):
                grads = engine.vmapped(tensors, leaves, spec, batched, chunk_size)
        except (BatchFormatError, InfluenceError):
            raise
        except Exception as error:  # vmap could not run this model: find out where, then loop
            with batching_rule_warnings(model, "per-example gradients"):
                where = _failing_module(
                    model, lambda: engine.vmapped(tensors, leaves, spec, batched, chunk_size)
                )
            _LOOP_MODELS[model] = where
            reason, fix = explain_failure(model, error)
            warnings.warn(
                f"Per-example gradients of this {type(model).__name__} fall back to a loop over "
                f"examples (exact, but slower): torch.func.vmap cannot run module {where} "
                f"because {reason}." + (f" Fix: {fix}." if fix else "")
                + " (Reported once per model.)",
                FallbackWarning,
                stacklevel=2,
            )
            grads = engine.looped(tensors, leaves, spec, batched, n)
    else:
        grads = engine.looped(tensors, leaves, spec, batched, n)
    return layout.flatten(grads, batch_dims=1)
