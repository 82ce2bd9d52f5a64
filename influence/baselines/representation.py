"""``RepresentationSimilarity`` (RepSim): similarity of hidden representations."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..exceptions import BatchFormatError, InfluenceError
from ..tasks import OutputTask, Task
from ._base import Baseline, check_choice
from .gradient_similarity import normalize_rows

SIMILARITIES = ("cosine", "dot")
POOLINGS = ("mean", "last", "last_prompt")


def pool(H: torch.Tensor, batch: Any, pooling: str) -> torch.Tensor:
    """Pools token representations ``(B, T, D)`` to ``(B, D)``; ``(B, D)`` passes through.

    - ``"mean"``: mean over non-padding tokens (``attention_mask`` 1; all tokens without one);
    - ``"last"``: the last non-padding token (works for left and right padding);
    - ``"last_prompt"``: the last token of the prompt in prompt/response data, i.e. the token
      just before the first position whose label is not ``-100`` (the representation the
      model has when it starts answering; Li et al. 2024).
    """
    if H.dim() == 2:
        return H
    if H.dim() != 3:
        raise InfluenceError(
            f"Representations must be (B, D) or (B, T, D); got shape {tuple(H.shape)}. Choose "
            "another layer, or pass a callable returning one of these shapes."
        )
    B, T, _ = H.shape
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    mask = torch.ones(B, T, dtype=torch.bool, device=H.device) if mask is None else mask.bool()
    positions = torch.arange(T, device=H.device).expand(B, T)
    if pooling == "mean":
        weights = mask.to(H.dtype)
        return (H * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
    if pooling == "last":
        index = torch.where(mask, positions, -1).max(1).values.clamp_min(0)
    else:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if labels is None:
            raise BatchFormatError(
                "pooling='last_prompt' needs dict batches with 'labels' (-100 on the prompt "
                "tokens, token ids on the response); this batch has none. Use pooling='last' "
                "or 'mean' for data without a prompt/response split."
            )
        response = (labels != -100) & mask
        first = torch.where(response, positions, T).min(1).values
        bad = (first == 0) | (first == T)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten().tolist()[:10]
            raise BatchFormatError(
                f"pooling='last_prompt': examples {rows} of the batch have no prompt (labels "
                "start at token 0) or no response (all labels -100), so the last prompt token "
                "is undefined. Check the labels, or use pooling='last'."
            )
        index = first - 1
    return H[torch.arange(B, device=H.device), index]


class RepresentationSimilarity(Baseline):
    """RepSim: scores by the similarity of a hidden representation of query and training data.

    ``score(z, z_j) = sim(h(z), h(z_j))`` with ``h`` a module's output pooled over tokens and
    ``sim`` cosine (default) or dot product. The study that found influence functions failing
    on fine-tuned LLMs (Li et al. 2024, "Do Influence Functions Work on Large Language
    Models?") found this baseline near perfect at identifying the training data behind a
    generation. It needs no gradients: one forward pass per example.

    Args:
        layer: where the representation comes from: the name of a submodule (its output is
            captured with a forward hook while ``task.forward`` runs the model; a tuple output
            gives its first element, an object its ``last_hidden_state``), a callable
            ``layer(model, batch) -> (B, D) or (B, T, D)``, or ``None`` for the model's output
            (``task.forward``).
        similarity: ``"cosine"`` or ``"dot"``.
        pooling: for token representations: ``"mean"``, ``"last"`` or ``"last_prompt"``
            (see :func:`pool`).
        task: runs the model on a batch (``task.forward``); default ``ClassificationTask()``.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = [(torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))]
        >>> repsim = RepresentationSimilarity(layer="1").fit(model, data)
        >>> repsim.pairwise_scores(data).shape
        torch.Size([5, 5])
    """

    def __init__(
        self,
        layer: str | Callable[[nn.Module, Any], torch.Tensor] | None = None,
        similarity: str = "cosine",
        pooling: str = "mean",
        task: Task | None = None,
    ):
        self.layer = layer
        self.similarity = similarity
        self.pooling = pooling
        self.task = task

    def _fit(self, model, train_loader):
        check_choice(self.similarity, "similarity", SIMILARITIES)
        check_choice(self.pooling, "pooling", POOLINGS)
        if not callable(self.layer) and not isinstance(self.task_, OutputTask):
            raise InfluenceError(
                f"RepresentationSimilarity runs the model through task.forward, which "
                f"{type(self.task_).__name__} does not have. Use an OutputTask (e.g. "
                "ClassificationTask, LanguageModelingTask) or pass layer=callable(model, batch)."
            )
        if isinstance(self.layer, str):
            try:
                model.get_submodule(self.layer)
            except AttributeError:
                names = [n for n, _ in model.named_modules() if n][:30]
                raise ValueError(
                    f"layer {self.layer!r} is not a submodule of {type(model).__name__}. "
                    f"Available: {names}."
                ) from None
        elif self.layer is not None and not callable(self.layer):
            raise TypeError(
                f"layer must be a module name, a callable(model, batch) or None; got "
                f"{type(self.layer).__name__}."
            )

    def representations(self, batch: Any) -> torch.Tensor:
        """Pooled representations ``(B, D)`` of one batch (no gradients)."""
        model = self.model_
        with torch.no_grad():
            if callable(self.layer):
                H = self.layer(model, batch)
            elif self.layer is None:
                H = self.task_.forward(model, batch)
            else:
                captured = []
                handle = model.get_submodule(self.layer).register_forward_hook(
                    lambda m, a, out: captured.append(out)
                )
                try:
                    self.task_.forward(model, batch)
                finally:
                    handle.remove()
                H = _tensor_of(captured[-1] if captured else None, self.layer)
        return pool(H.detach(), batch, self.pooling)

    def _features(self, batch, role):
        H = self.representations(batch)
        return [normalize_rows(H) if self.similarity == "cosine" else H]


def _tensor_of(out: Any, layer: str) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    if not isinstance(out, torch.Tensor):
        raise InfluenceError(
            f"Module {layer!r} produced {type(out).__name__}, not a tensor (or it never ran in "
            "task.forward). Pick a module that outputs a tensor, or pass a callable layer."
        )
    return out
