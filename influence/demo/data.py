"""Examples, a word-level tokenizer and padded batches for the demo's tiny language model.

An :class:`Example` is a prompt, a response and a class label. Encoded as
``<bos> prompt <sep> response <eos>``, its ``labels`` are ``-100`` on ``<bos>``, the prompt and
``<sep>`` (no loss there) and the token ids on the response and ``<eos>``, the HuggingFace
convention that :class:`~influence.LanguageModelingTask` reads (the loss is the **sum** of the
next-token cross-entropy over the response tokens). Batches are right-padded with ``<pad>``
(id 0) and carry an ``attention_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

PAD, BOS, SEP, EOS = "<pad>", "<bos>", "<sep>", "<eos>"
SPECIALS = (PAD, BOS, SEP, EOS)


@dataclass(frozen=True)
class Example:
    """One prompt → response pair.

    Attributes:
        prompt: space-separated words.
        response: space-separated words.
        label: the class index (the ground truth of attribution).
        meta: free-form details (e.g. the backdoor pair id, the trigger).
    """

    prompt: str
    response: str
    label: int
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.response}"


class WordTokenizer:
    """A fixed word-level vocabulary: specials first, then the given words in sorted order.

    Examples:
        >>> tok = WordTokenizer(["b", "a"])
        >>> tok.encode("a b a")
        [4, 5, 4]
        >>> tok.decode([4, 5])
        'a b'
    """

    def __init__(self, words: Iterable[str]):
        extra = sorted(set(words) - set(SPECIALS))
        self.vocab = list(SPECIALS) + extra
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return self.ids[PAD]

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self.ids]
        if unknown:
            raise KeyError(
                f"Words {sorted(set(unknown))[:10]} are not in the demo vocabulary "
                f"({len(self)} words). Build the tokenizer from a word list containing them."
            )
        return [self.ids[w] for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)


def encode_example(tok: WordTokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example; labels are ``-100`` up to and including ``<sep>``."""
    prompt = tok.encode(f"{BOS} {ex.prompt} {SEP}")
    response = tok.encode(f"{ex.response} {EOS}")
    return prompt + response, [-100] * len(prompt) + response


def collate(tok: WordTokenizer, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
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
    tok: WordTokenizer, examples: Sequence[Example], batch_size: int
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
