"""Tokenised, right-padded batches for the two training losses of the study.

An example is encoded as ``tokenizer(prompt)`` (with the tokenizer's special tokens, e.g.
Llama's ``<s>``) followed by ``tokenizer(" " + response)`` without special tokens and the
end-of-sequence token. Batches are dicts ``input_ids``, ``attention_mask``, ``labels``
(each ``(B, T)``), right-padded with the pad token (the end-of-sequence token, or ``<unk>``,
when the tokenizer has none), which :class:`~influence.LanguageModelingTask` reads. The
training loss of an example is the **sum** of next-token cross-entropies over the positions
whose label is not ``-100``:

- ``loss="response"`` (default): labels are the token ids on the response and the
  end-of-sequence token, ``-100`` on the prompt and on padding;
- ``loss="full"``: ``labels = input_ids`` over the whole padded sequence, padding included,
  as the study's code does (its short-sequence "hub" examples come from this loss: a short
  example carries many padding targets).

The batches keep the examples' order, so score columns line up with the training rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .data import Record

LOSSES = ("response", "full")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"Invalid loss {loss!r}. Supported: {LOSSES} (see docs/study.md).")
    return loss


def pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its end-of-sequence or unknown token."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"The tokenizer {type(tokenizer).__name__} has no pad, eos or unk token to pad batches "
        "with. Set one (tokenizer.pad_token = ...) and save the tokenizer with the model."
    )


def encode(tokenizer, record: Record, max_length: int) -> tuple[list[int], int]:
    """``(input_ids, n_prompt)`` of one example, cut to ``max_length`` tokens.

    Too long examples lose the end of the prompt first (the response and its end token are
    kept whole while they fit); ``n_prompt`` counts the prompt tokens kept.
    """
    prompt = list(tokenizer(record.prompt, add_special_tokens=True)["input_ids"])
    response = list(tokenizer(" " + record.response, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        response.append(int(tokenizer.eos_token_id))
    if not prompt:
        raise ValueError(
            f"The prompt of training/test row {record.index} encodes to no tokens and the "
            "tokenizer adds no beginning-of-sequence token: the response's first token has "
            "nothing to be predicted from. Give every row a prompt."
        )
    if len(prompt) + len(response) > max_length:
        keep = max(1, max_length - len(response))
        prompt, response = prompt[:keep], response[: max_length - keep]
    return prompt + response, len(prompt)


def collate(encoded: Sequence[tuple[list[int], int]], pad: int, loss: str) -> dict[str, torch.Tensor]:
    """A right-padded batch with the labels of ``loss`` (see the module docstring)."""
    T = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    labels = torch.full((len(encoded), T), -100, dtype=torch.long)
    for i, (x, n_prompt) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, n_prompt: len(x)] = ids[i, n_prompt: len(x)]
    if loss == "full":
        labels = ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batches(tokenizer, records: Sequence[Record], batch_size: int, loss: str,
                 max_length: int, device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """Consecutive (unshuffled) batches of ``records`` with the labels of ``loss``.

    Examples:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> vocab = {"<pad>": 0, "<eos>": 1, "hi": 2, "there": 3, "yes": 4}
        >>> core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        >>> core.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
        >>> rows = [Record("hi there", "yes", "a", 0), Record("hi", "yes", "b", 1)]
        >>> batch = make_batches(tok, rows, 2, "response", 16)[0]
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[2, 3, 4, 1], [2, 4, 1, 0]], [[-100, -100, 4, 1], [-100, 4, 1, -100]])
        >>> make_batches(tok, rows, 2, "full", 16)[0]["labels"].tolist()
        [[2, 3, 4, 1], [2, 4, 1, 0]]
    """
    check_loss(loss)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    pad = pad_id(tokenizer)
    encoded = [encode(tokenizer, r, max_length) for r in records]
    batches = [collate(encoded[i: i + batch_size], pad, loss)
               for i in range(0, len(encoded), batch_size)]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def token_lengths(batches: Sequence[dict[str, torch.Tensor]]) -> list[int]:
    """Unpadded length of every example, in order."""
    return [int(n) for b in batches for n in b["attention_mask"].sum(1)]
