"""Tasks: how a batch becomes per-example training losses and measurements.

A :class:`Task` reads whatever structure the user's DataLoader yields. Two methods matter:

- ``loss(model, batch) -> Tensor[B]``: the per-example training loss ``ℓ(z_j)`` (no reduction,
  no ``1/B`` factor: per-example gradients never depend on the loader's batch size);
- ``measurement(model, batch) -> Tensor[B]``: the attributed quantity ``m(z_i)`` of a query
  (default: the loss).

The ready-made tasks also split the loss into ``outputs = forward(model, batch)`` and
``output_loss(outputs, targets, batch)``; curvatures that need the output space (Gauss-Newton,
the true Fisher with ``sample_targets(outputs, batch, draws)``, the expected Fisher with
``output_hessian_sqrt(outputs, batch)``) use that split (:class:`OutputTask`).

Per-example functions are evaluated under ``torch.func.vmap`` with each example presented as a
batch of one, so a task must not depend on the batch size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from .draws import TargetDraws
from .exceptions import BatchFormatError


def sample_categorical(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One class per row of ``logits (..., C)`` drawn from ``softmax(logits)``, shape ``(...)``.

    Inverse-CDF sampling: with the cumulative sums ``F_k = Σ_{j<=k} p_j`` (float64) and one
    uniform ``u ∈ [0, 1)`` per row (``uniforms``, shape ``(...)``, e.g.
    :meth:`TargetDraws.uniform <influence.draws.TargetDraws.uniform>`), the class is the first
    ``k`` with ``F_k > u·F_{C-1}``, so class ``k`` is drawn with probability ``p_k / Σ p`` and a
    class of probability zero never is. About 10x cheaper on the CPU than
    ``torch.multinomial`` (which draws ``C`` exponentials per row) for a 2,048-token vocabulary.

    Examples:
        >>> import torch
        >>> sample_categorical(torch.tensor([[0.0, 0.0], [0.0, float("-inf")]]), torch.tensor([0.7, 0.7]))
        tensor([1, 0])
    """
    if uniforms.shape != logits.shape[:-1]:
        raise ValueError(
            f"sample_categorical: uniforms must have the logits' shape without the class "
            f"dimension, {tuple(logits.shape[:-1])}; got {tuple(uniforms.shape)}."
        )
    cdf = torch.softmax(logits.detach(), dim=-1).to(torch.float64).cumsum(-1)
    u = uniforms.to(device=cdf.device, dtype=torch.float64)
    k = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return k.clamp_max(logits.shape[-1] - 1)


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "dict with keys " + repr(sorted(map(str, batch.keys())))
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of length {len(batch)}"
    return type(batch).__name__


class Task(ABC):
    """Turns a batch into per-example losses and measurements. Subclass for custom batches.

    ``loss`` returns one loss per example (no batch mean); ``measurement`` (default: the loss)
    is what a query's score attributes. A plain ``Task`` serves the Identity, Hessian and
    empirical-Fisher curvatures; the Gauss-Newton and true-Fisher ones need an
    :class:`OutputTask`.

    Examples:
        A task for loaders that yield dicts with ``"features"`` and ``"label"``:

        >>> import torch, influence
        >>> class DictClassification(influence.Task):
        ...     def loss(self, model, batch):
        ...         logits = model(batch["features"])
        ...         return torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")
        >>> model = torch.nn.Linear(3, 2)
        >>> batch = {"features": torch.randn(5, 3), "label": torch.tensor([0, 1, 1, 0, 1])}
        >>> DictClassification().loss(model, batch).shape
        torch.Size([5])
        >>> est = influence.InfluenceEstimator(influence.Identity(), DictClassification()).fit(model, [batch])
        >>> est.pairwise_scores([batch]).shape
        torch.Size([5, 5])
    """

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example training loss, shape ``(B,)``."""

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example attributed quantity of a query, shape ``(B,)``; default: the loss."""
        return self.loss(model, batch)

    def measured(self, batch: Any) -> torch.Tensor | None:
        """``(B,)`` booleans: False for an example whose loss and measurement have no term at
        all (e.g. a language-model sequence whose labels are all ``-100``), so that its gradient
        and every score it takes part in are exactly 0; ``None`` when the task cannot tell
        (the default). The estimator reports such examples instead of returning zeros."""
        return None

    def num_examples(self, batch: Any) -> int:
        """Number of examples in ``batch``: the leading size of its first tensor."""
        leaves, _ = tree_flatten(batch)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                return int(leaf.shape[0])
        raise BatchFormatError(
            f"{type(self).__name__} could not find a tensor with a batch dimension in the batch "
            f"({_describe(batch)}). Yield tensors from the loader, or override num_examples()."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class OutputTask(Task):
    """A task whose loss is ``output_loss(forward(model, batch), targets(batch), batch)``.

    The split lets curvatures form Gauss-Newton products ``Jᵀ H_out J`` and the true Fisher
    (targets drawn from the model's predictive distribution by :meth:`sample_targets`).

    Examples:
        Binary classification with one logit per example (``BCEWithLogits``):

        >>> import torch, influence
        >>> class Binary(influence.OutputTask):
        ...     def forward(self, model, batch):
        ...         return model(batch[0]).squeeze(-1)
        ...     def targets(self, batch):
        ...         return batch[1].to(torch.float64)
        ...     def output_loss(self, outputs, targets, batch):
        ...         return torch.nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        ...     def sample_targets(self, outputs, batch, draws):
        ...         u = draws.uniform(outputs.shape[1:]).to(outputs)
        ...         return (u < torch.sigmoid(outputs.detach())).to(outputs.dtype)
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 1).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> cur = influence.Exact(damping=1e-2, curvature_type="ggn").fit(model, Binary(), data)
        >>> cur.matrix_.shape
        torch.Size([4, 4])
    """

    @abstractmethod
    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Model outputs of the batch, batch-first."""

    @abstractmethod
    def targets(self, batch: Any) -> torch.Tensor:
        """The batch's targets, in the form :meth:`output_loss` takes."""

    @abstractmethod
    def output_loss(self, outputs: torch.Tensor, targets: torch.Tensor, batch: Any) -> torch.Tensor:
        """Per-example loss ``(B,)`` from outputs and targets."""

    @abstractmethod
    def sample_targets(self, outputs: torch.Tensor, batch: Any, draws: TargetDraws) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs``.

        Take every random number from ``draws`` (:class:`~influence.draws.TargetDraws`: row
        ``b`` is keyed by example ``b``'s global index), e.g. ``draws.uniform(shape)`` for
        ``sample_categorical`` or ``draws.normal(shape)``, with ``shape`` the per-example shape
        of what is drawn: then an example's targets do not depend on the batch size, the
        number of processes or a resumed fit, and neither does the fit.
        """

    def num_output_hessian_columns(self, outputs: torch.Tensor, batch: Any) -> int | None:
        """``K``, the number of columns of :meth:`output_hessian_sqrt` (cheap: no columns are
        formed), or ``None`` when the task has no closed-form square root (the default): the
        expected Fisher (``fisher_type="expected"``) then samples targets as the true Fisher does.
        """
        return None

    def output_hessian_sqrt(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """``U`` of shape ``(K, *outputs.shape)``: a square root of the output Hessian.

        For every example ``b``, ``H_b = Σ_k U[k, b] U[k, b]ᵀ`` where ``H_b`` is the Hessian of
        ``output_loss`` of example ``b`` in its outputs (flattened) at ``outputs``, so that the
        Gauss-Newton matrix of the example is ``Σ_k (J_bᵀ U[k, b]) (J_bᵀ U[k, b])ᵀ``: ``K``
        vector-Jacobian products, no sampling (Martens & Grosse 2015, §5). Implement it together
        with :meth:`num_output_hessian_columns` for losses whose ``H`` does not depend on the
        targets (cross-entropy, squared error); ``outputs`` come detached.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form square root of its output Hessian: "
            "implement num_output_hessian_columns and output_hessian_sqrt."
        )

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.output_loss(self.forward(model, batch), self.targets(batch), batch)


_INPUT_KEYS = ("x", "input", "inputs", "features", "pixel_values")
_TARGET_KEYS = ("y", "label", "labels", "target", "targets")


class _SupervisedTask(OutputTask):
    """Shared batch reading for ``(x, y)`` / ``{"x": ..., "y": ...}`` batches."""

    def __init__(self, input_key: str | None = None, target_key: str | None = None):
        self.input_key = input_key
        self.target_key = target_key

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            x_key = self.input_key or next((k for k in _INPUT_KEYS if k in batch), None)
            y_key = self.target_key or next((k for k in _TARGET_KEYS if k in batch), None)
            if x_key not in batch or y_key not in batch:
                raise BatchFormatError(
                    f"{type(self).__name__} could not read a {_describe(batch)}: expected an "
                    f"input key (one of {_INPUT_KEYS}) and a target key (one of {_TARGET_KEYS}). "
                    "Pass input_key=... and target_key=... to name yours."
                )
            return batch[x_key], batch[y_key]
        if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 2:
            return batch[0], batch[1]
        raise BatchFormatError(
            f"{type(self).__name__} could not read a batch of type {_describe(batch)}: expected "
            "(inputs, targets) as a tuple/list of length 2 or a dict with input and target keys. "
            "Write a custom Task subclass for other batch structures."
        )

    def forward(self, model, batch):
        x, _ = self._split(batch)
        return model(x)

    def targets(self, batch):
        return self._split(batch)[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_key={self.input_key!r}, target_key={self.target_key!r})"


def class_indices(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(indices, valid)``: class-index targets as ``long``, and which were whole numbers.

    Float labels must hold whole numbers: ``1.0`` is converted; a non-integer one (``0.7``,
    NaN) raises :class:`BatchFormatError` naming it, instead of being truncated by ``.long()``.
    Under torch.func transforms (the per-example vmap) Python cannot read tensor values, so
    there ``valid`` marks the whole-number labels (``None`` for integer labels) and the caller
    multiplies the other examples' losses by NaN, so that their gradients are NaN and the
    library's finiteness checks report them.
    """
    if not targets.is_floating_point():
        return targets.long(), None
    whole = targets == targets.round()
    if not torch._C._functorch.is_functorch_wrapped_tensor(targets):
        if not bool(whole.all()):
            bad = targets[~whole].flatten()[0].item()
            raise BatchFormatError(
                f"ClassificationTask needs class indices as targets, but a {targets.dtype} label "
                f"is {bad:g}, not a whole number (.long() would silently truncate it). Pass "
                "integer class indices of shape (B,); for soft labels write a custom OutputTask "
                "with the loss you intend."
            )
        return targets.long(), None
    return torch.where(whole, targets, torch.zeros_like(targets)).long(), whole


def _nan_unless(valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 where ``valid``, NaN elsewhere: a factor that makes values *and* gradients NaN."""
    return torch.where(valid, 1.0, torch.nan).to(like.dtype)


class ClassificationTask(_SupervisedTask):
    """Cross-entropy classification: ``ℓ = −log softmax(f(x))_y``.

    Batches are ``(x, y)`` or dicts with input/target keys; ``y`` holds class indices.
    ``measurement="loss"`` (default) or ``"margin"``: the query's logit margin
    ``f_y − logsumexp_{c≠y} f_c``, whose *negative* is attributed so that positive scores
    still mean "helpful" (raising the margin lowers the negative margin).

    Examples:
        >>> import torch
        >>> task = ClassificationTask()
        >>> model = torch.nn.Linear(3, 4)
        >>> task.loss(model, (torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]))).shape
        torch.Size([5])
    """

    def __init__(self, measurement: str = "loss", input_key=None, target_key=None):
        super().__init__(input_key, target_key)
        if measurement not in ("loss", "margin"):
            raise ValueError(
                f"Invalid measurement {measurement!r}. Supported: ('loss', 'margin')."
            )
        self.measurement_kind = measurement

    @staticmethod
    def _check_outputs(outputs):
        if outputs.dim() != 2:
            raise BatchFormatError(
                f"ClassificationTask expects model outputs of shape (B, num_classes); got "
                f"{tuple(outputs.shape)}. Use LanguageModelingTask for sequence outputs."
            )

    def output_loss(self, outputs, targets, batch):
        self._check_outputs(outputs)
        if targets.dim() != 1:
            raise BatchFormatError(
                f"ClassificationTask expects class-index targets of shape (B,); got "
                f"{tuple(targets.shape)}. For one-hot labels pass y.argmax(-1)."
            )
        indices, valid = class_indices(targets)
        losses = F.cross_entropy(outputs, indices, reduction="none")
        return losses if valid is None else losses * _nan_unless(valid, losses)

    def sample_targets(self, outputs, batch, draws):
        return sample_categorical(outputs, draws.uniform())

    def num_output_hessian_columns(self, outputs, batch):
        """``C``, the number of classes."""
        self._check_outputs(outputs)
        return outputs.shape[-1]

    def output_hessian_sqrt(self, outputs, batch):
        """Columns ``U[c, b] = √p_bc (e_c − p_b)``, ``p_b = softmax(outputs_b)``, shape ``(C, B, C)``.

        ``Σ_c p_c (e_c − p)(e_c − p)ᵀ = diag(p) − ppᵀ``, the Hessian of the cross-entropy in the
        logits: column ``c`` is the loss gradient at target ``c`` weighted by ``√p_c``, so the
        ``C`` columns give the true Fisher's expectation over the classes exactly.

        Examples:
            >>> import torch
            >>> U = ClassificationTask().output_hessian_sqrt(torch.tensor([[0.0, 1.0, -1.0]]), None)
            >>> p = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0)
            >>> torch.allclose(torch.einsum("kbi,kbj->ij", U, U), torch.diag(p) - torch.outer(p, p))
            True
        """
        self._check_outputs(outputs)
        p = torch.softmax(outputs.detach(), dim=-1)
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        return p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])

    def measurement(self, model, batch):
        if self.measurement_kind == "loss":
            return self.loss(model, batch)
        logits = self.forward(model, batch)
        y, valid = class_indices(self.targets(batch))
        correct = logits.gather(-1, y[:, None]).squeeze(-1)
        others = logits.scatter(-1, y[:, None], float("-inf"))
        margin = -(correct - torch.logsumexp(others, dim=-1))
        return margin if valid is None else margin * _nan_unless(valid, margin)

    def __repr__(self) -> str:
        return f"ClassificationTask(measurement={self.measurement_kind!r})"


class RegressionTask(_SupervisedTask):
    """Squared error ``ℓ = ½ ‖f(x) − y‖²`` summed over output dimensions.

    The ``½`` makes the output-space Hessian the identity, so the Gauss-Newton matrix is
    ``JᵀJ``. ``y`` may be ``(B,)`` for a single output.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        >>> loss = RegressionTask().loss(model, (x, y))
        >>> torch.allclose(loss, 0.5 * (model(x).squeeze(-1) - y) ** 2)
        True
    """

    def output_loss(self, outputs, targets, batch):
        targets = targets.to(outputs.dtype)
        if targets.shape != outputs.shape:
            targets = targets.reshape(outputs.shape)
        return 0.5 * (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(-1)

    def sample_targets(self, outputs, batch, draws):
        """``y ~ N(f(x), I)`` (the squared error's predictive distribution), per coordinate."""
        noise = draws.normal(outputs.shape[1:])
        return outputs.detach() + noise.to(device=outputs.device, dtype=outputs.dtype)

    def num_output_hessian_columns(self, outputs, batch):
        """``D``, the number of output coordinates per example."""
        return math.prod(outputs.shape[1:])

    def output_hessian_sqrt(self, outputs, batch):
        """The identity (the output Hessian of ``½‖f − y‖²``): ``U[k, b]`` is the ``k``-th unit
        vector of the output space, shape ``(D, B, *outputs.shape[1:])``."""
        D = math.prod(outputs.shape[1:])
        eye = torch.eye(D, dtype=outputs.dtype, device=outputs.device)
        return eye[:, None, :].expand(D, outputs.shape[0], D).reshape(D, *outputs.shape)


class LanguageModelingTask(OutputTask):
    """Next-token cross-entropy summed over non-padding target tokens of each example.

    Batches are dicts as HuggingFace produces them: ``input_ids (B, T)``, optional
    ``attention_mask (B, T)`` and optional ``labels (B, T)`` with ``-100`` ignored. Without
    labels, the targets are ``input_ids`` with padding (mask 0) ignored. Logits at position
    ``t`` predict the label at ``t + 1``. The model is called as
    ``model(input_ids=..., attention_mask=...)`` and may return logits or an object with
    ``.logits`` (HuggingFace).

    Examples:
        >>> import torch
        >>> from influence.lm import TinyLM, TinyLMConfig
        >>> torch.manual_seed(0) and None
        >>> model = TinyLM(TinyLMConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=6)).eval()
        >>> batch = {"input_ids": torch.tensor([[1, 5, 7, 2, 0], [1, 4, 2, 0, 0]]),
        ...          "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}
        >>> loss = LanguageModelingTask().loss(model, batch)  # sums over 3 and 2 target tokens
        >>> logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        >>> ce = torch.nn.functional.cross_entropy(logits[0, :3], batch["input_ids"][0, 1:4], reduction="sum")
        >>> loss.shape, torch.allclose(loss[0], ce)
        (torch.Size([2]), True)
    """

    def __init__(self, pass_attention_mask: bool = True):
        self.pass_attention_mask = pass_attention_mask

    def _check(self, batch):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise BatchFormatError(
                f"LanguageModelingTask could not read a {_describe(batch)}: expected a dict with "
                "'input_ids' (B, T) and optionally 'attention_mask' and 'labels' (-100 ignored), "
                "as a HuggingFace data collator produces."
            )

    def forward(self, model, batch):
        self._check(batch)
        kwargs = {"input_ids": batch["input_ids"]}
        if self.pass_attention_mask and "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        out = model(**kwargs)
        return out.logits if hasattr(out, "logits") else out

    def targets(self, batch):
        self._check(batch)
        if "labels" in batch:
            labels = batch["labels"]
        else:
            labels = batch["input_ids"]
            if "attention_mask" in batch:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        return labels[:, 1:]

    def output_loss(self, outputs, targets, batch):
        logits = outputs[:, :-1]
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1).long(),
            ignore_index=-100,
            reduction="none",
        )
        return losses.reshape(targets.shape).sum(-1)

    # No output_hessian_sqrt: a sequence's output Hessian has (T - 1)·V columns (a square root per
    # target token, and the tokens interact through attention), far too many backward passes;
    # fisher_type="expected" samples targets for language models (see influence.curvature._fisher).

    def sample_targets(self, outputs, batch, draws):
        """One token per target position ``t`` (keyed by ``t``: right padding keeps the keys)."""
        targets = self.targets(batch)
        logits = outputs[:, :-1]
        sampled = sample_categorical(logits, draws.uniform(logits.shape[1:-1]))
        return torch.where(targets == -100, targets, sampled)

    def token_mask(self, batch) -> torch.Tensor:
        """``(B, T-1)`` boolean mask of the target tokens that count in the loss."""
        return self.targets(batch) != -100

    def measured(self, batch) -> torch.Tensor:
        """``(B,)``: whether each sequence has at least one target token (label not ``-100``,
        not padding)."""
        return self.token_mask(batch).any(dim=1)
