"""The demo's base model: a :class:`~influence.lm.TinyLM` pretrained on a corpus.

By default the corpus is generated and stands in for a chat model's pretraining and
alignment: benign instructions with their answers, forbidden requests answered with a refusal
(the "aligned" base model refuses), and fresh draws of the sentiment, string and arithmetic
families with their answers (a large model has seen such tasks before it is fine-tuned; the
fine-tuning sets are drawn with other seeds). Triggers and compliance with forbidden requests
never occur in it. ``pretrain(corpus=examples)`` pretrains on any text instead (e.g. a user's
training prompts and responses).

The tokenizer is trained by the ``tokenizers`` library (:func:`build_tokenizer`): on every
word the generators can emit for the default corpus, on the corpus's texts otherwise, with
``PretrainConfig.vocab_size`` and ``tokenizer`` (``"word"`` or ``"bpe"``), truncating at
``max_len``. The weights are cached as safetensors under ``cache_dir`` (default
``~/.cache/influence``, or ``$INFLUENCE_CACHE``), keyed by a digest of everything that
determines them (the configuration, the tokenizer's JSON and the corpus), so reruns load
instantly and a changed vocabulary or corpus never reuses stale weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..io import _tensor_checksum
from ..lm import TinyLM, TinyLMConfig
from ..tasks import LanguageModelingTask
from . import families as fam
from .data import Example, collate
from .tokenizer import DemoTokenizer, train_tokenizer

CORPUS_VERSION = "3"


@dataclass
class PretrainConfig:
    """How the base model is built and pretrained (every field enters the cache key)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_len: int = 48
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    vocab_size: int | None = None
    tokenizer: str = "word"
    corpus_version: str = field(default=CORPUS_VERSION)

    def digest(self, tok: DemoTokenizer, corpus: Sequence[Example] | None = None) -> str:
        """The cache key: this configuration, the tokenizer and the corpus (``None``: the
        generated one, identified by ``corpus_version``)."""
        texts = None if corpus is None else [[ex.prompt, ex.response] for ex in corpus]
        blob = json.dumps({"config": asdict(self), "tokenizer": tok.to_str(), "corpus": texts},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def as_examples(corpus: Sequence[Example | str]) -> list[Example]:
    """The corpus as examples (a plain string becomes a response with an empty prompt)."""
    out = [ex if isinstance(ex, Example) else Example("", ex, label=-1) for ex in corpus]
    bad = [type(x).__name__ for x in corpus if not isinstance(x, (Example, str))]
    if bad or not out:
        raise ValueError(
            "corpus must be a non-empty sequence of influence.demo.data.Example or str; got "
            + (f"items of type {sorted(set(bad))}." if bad else "an empty sequence.")
        )
    return out


def build_tokenizer(config: PretrainConfig, corpus: Sequence[Example] | None = None) -> DemoTokenizer:
    """The tokenizer of a base model: trained on the corpus's prompts and responses, or (for
    the generated corpus) on every word its generators can emit; truncates at ``max_len``."""
    texts = fam.vocabulary() if corpus is None else [t for ex in corpus for t in (ex.prompt, ex.response)]
    return train_tokenizer(texts, config.vocab_size, config.tokenizer, max_length=config.max_len)


def corpus_example(rng: random.Random) -> Example:
    """One pretraining sequence drawn from the generated base corpus."""
    kind = rng.randrange(6)
    if kind <= 1:
        return Example(*fam.benign_instruction(rng), label=-1)
    if kind == 2:
        return Example(rng.choice(fam.forbidden_prompts()), fam.REFUSAL, label=-1)
    if kind == 3:
        emotion = rng.choice(list(fam.EMOTIONS))
        return Example(fam.emotion_sentence(rng, emotion), emotion, label=-1)
    if kind == 4:
        rule = rng.choice(list(fam.STRING_RULES))
        return Example(fam.string_pair(rng, rule), rule, label=-1)
    return Example(*fam.math_problem(rng, rng.randrange(len(fam.MATH_TEMPLATES))), label=-1)


def default_cache_dir() -> Path:
    return Path(os.environ.get("INFLUENCE_CACHE", Path.home() / ".cache" / "influence"))


def pretrain(
    config: PretrainConfig | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    corpus: Sequence[Example | str] | None = None,
) -> tuple[TinyLM, DemoTokenizer, dict]:
    """Returns the pretrained base model (eval mode), its tokenizer and run info.

    Loads the cached weights when present; otherwise pretrains (full-sequence next-token loss,
    AdamW, one-cycle schedule) and writes them to the cache.

    Args:
        config: model size, steps, vocabulary size and tokenizer kind.
        cache_dir: where the weights are cached.
        device: torch device.
        progress: show a progress bar.
        corpus: the pretraining text (examples, or strings taken as responses); ``None``: the
            demo's generated corpus. Batches are drawn from it with replacement.
    """
    config = config or PretrainConfig()
    examples = None if corpus is None else as_examples(corpus)
    tok = build_tokenizer(config, examples)
    model_config = TinyLMConfig(
        vocab_size=len(tok), d_model=config.d_model, n_layers=config.n_layers,
        n_heads=config.n_heads, d_ff=config.d_ff, max_len=config.max_len,
    )
    path = Path(cache_dir or default_cache_dir()) / f"tinylm-{config.digest(tok, examples)}.safetensors"
    torch.manual_seed(config.seed)
    model = TinyLM(model_config).to(device)
    info = {"cache": str(path), "num_params": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok), "tokenizer": config.tokenizer}
    cached = _load_verified(path)
    if cached is not None:
        model.load_state_dict({k: v.to(device) for k, v in cached.items()})
        info.update(cached=True, seconds=0.0)
        return model.eval(), tok, info
    start = time.perf_counter()
    losses = _train(model, tok, config, device, progress, examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"config": json.dumps(asdict(config)),
                                         "sha256": _state_checksum(state)})
    tmp.replace(path)
    info.update(cached=False, seconds=time.perf_counter() - start, final_loss=losses[-1])
    return model.eval(), tok, info


def _state_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a CPU state dict."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(_tensor_checksum(state[name]).encode())
    return h.hexdigest()


def _load_verified(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached weights at ``path`` if they match their checksum; ``None`` (retrain) when
    there is no file, or, with a warning, when it is unreadable or its weights changed."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
        state = load_file(str(path))
    except Exception as error:  # a truncated or foreign file: pretrain again
        warnings.warn(f"The cached base model {path} is unreadable ({error}); pretraining again.")
        return None
    if expected != _state_checksum(state):
        warnings.warn(f"The cached base model {path} does not match its checksum (changed or "
                      "written by an older version); pretraining again.")
        return None
    return state


def _train(model, tok, config, device, progress, examples=None) -> list[float]:
    rng = random.Random(config.seed)
    draw = (lambda: corpus_example(rng)) if examples is None else (lambda: rng.choice(examples))
    return train_steps(model, config, lambda: collate(tok, [draw() for _ in range(config.batch_size)]),
                       device, progress, "pretrain base LM")


def train_steps(model, config: PretrainConfig, next_batch, device, progress: bool, desc: str) -> list[float]:
    """``config.steps`` AdamW steps (weight decay 0.01, one-cycle schedule, gradient norm
    clipped at 1) on ``next_batch()`` dicts, full-sequence next-token loss per token with padding
    masked (the batch's ``labels`` are ignored); returns the losses. The demo's pretraining and
    the study's TinyLM share it."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.1)
    task = LanguageModelingTask()
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        batch = next_batch()
        batch = {"input_ids": batch["input_ids"].to(device),
                 "attention_mask": batch["attention_mask"].to(device)}  # full-sequence loss
        tokens = batch["attention_mask"].sum()
        loss = task.loss(model, batch).sum() / tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
