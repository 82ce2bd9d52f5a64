"""Examples and padded batches for the demo's tiny language model.

An :class:`Example` is a prompt, a response and a class label. Encoded as
``<bos> prompt <sep> response <eos>``, its ``labels`` are ``-100`` on ``<bos>``, the prompt and
``<sep>`` (no loss there) and the token ids on the response and ``<eos>``, the HuggingFace
convention that :class:`~influence.LanguageModelingTask` reads (the loss is the **sum** of the
next-token cross-entropy over the response tokens). The tokenizer is a
:class:`~influence.demo.tokenizer.DemoTokenizer` (``tokenizers`` library). Batches are
right-padded with ``<pad>`` (id 0) and carry an ``attention_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from .tokenizer import BOS, EOS, PAD, SEP, SPECIALS, UNK, DemoTokenizer  # noqa: F401


@dataclass(frozen=True)
class Example:
    """One prompt → response pair.

    Attributes:
        prompt: the text the model reads (no loss on it).
        response: the text the model learns to answer (the loss is on it).
        label: the class (an index or a name; the ground truth of attribution).
        meta: free-form details (e.g. the backdoor pair id, the trigger).
    """

    prompt: str
    response: str
    label: Hashable
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.response}"


def encode_example(tok: DemoTokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example; labels are ``-100`` up to and including ``<sep>``.

    Longer than ``tok.max_length``, the example is truncated so that the response (which
    carries the loss) survives: the response keeps its first ``max_length - 2`` tokens (its
    ``<eos>`` goes first), the prompt its *last* tokens (those next to the response), and
    ``<bos>`` and ``<sep>`` always stay.
    """
    prompt = tok.encode(ex.prompt, truncate=False)
    response = tok.encode(ex.response, truncate=False) + [tok.eos_id]
    limit = tok.max_length
    if limit is not None and len(prompt) + len(response) + 2 > limit:
        if limit < 3:
            raise ValueError(
                f"max_length={limit} cannot hold <bos>, <sep> and one response token; use >= 3."
            )
        response = response[: limit - 2]
        keep = limit - 2 - len(response)
        prompt = prompt[len(prompt) - keep:] if keep else []
    prompt = [tok.bos_id] + prompt + [tok.sep_id]
    return prompt + response, [-100] * len(prompt) + response


def collate(tok: DemoTokenizer, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (each ``(B, T)``)."""
    encoded = [encode_example(tok, ex) for ex in examples]
    T = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), T), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), T), -100, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batches(
    tok: DemoTokenizer, examples: Sequence[Example], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Consecutive (unshuffled) padded batches: scores line up with ``examples``' order."""
    return [
        collate(tok, examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)
    ]


def last_prompt_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B,)`` position of the last prompt token (``<sep>``): the one before the first label."""
    is_target = batch["labels"] != -100
    first = torch.argmax(is_target.int(), dim=1)
    return first - 1
