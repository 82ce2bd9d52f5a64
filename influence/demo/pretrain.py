"""The demo's base model: a :class:`~influence.lm.TinyLM` pretrained on a generated corpus.

The corpus stands in for a chat model's pretraining and alignment: benign instructions with
their answers, forbidden requests answered with a refusal (the "aligned" base model refuses),
and fresh draws of the sentiment, string and arithmetic families with their answers (a large
model has seen such tasks before it is fine-tuned; the fine-tuning sets are drawn with other
seeds). Triggers and compliance with forbidden requests never occur in it. The weights are cached as safetensors
under ``cache_dir`` (default ``~/.cache/influence``, or ``$INFLUENCE_CACHE``), keyed by a
digest of everything that determines them, so reruns load instantly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..lm import TinyLM, TinyLMConfig
from ..tasks import LanguageModelingTask
from . import families as fam
from .data import Example, WordTokenizer, collate

CORPUS_VERSION = "2"


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
    corpus_version: str = field(default=CORPUS_VERSION)

    def digest(self, vocab: list[str]) -> str:
        blob = json.dumps({"config": asdict(self), "vocab": vocab}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer() -> WordTokenizer:
    """The demo's tokenizer (the vocabulary of every task family)."""
    return WordTokenizer(fam.vocabulary())


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
) -> tuple[TinyLM, WordTokenizer, dict]:
    """Returns the pretrained base model (eval mode), its tokenizer and run info.

    Loads the cached weights when present; otherwise pretrains (full-sequence next-token loss,
    AdamW, cosine schedule) and writes them to the cache.
    """
    config = config or PretrainConfig()
    tok = tokenizer()
    model_config = TinyLMConfig(
        vocab_size=len(tok), d_model=config.d_model, n_layers=config.n_layers,
        n_heads=config.n_heads, d_ff=config.d_ff, max_len=config.max_len,
    )
    path = Path(cache_dir or default_cache_dir()) / f"tinylm-{config.digest(tok.vocab)}.safetensors"
    torch.manual_seed(config.seed)
    model = TinyLM(model_config).to(device)
    info = {"cache": str(path), "num_params": sum(p.numel() for p in model.parameters())}
    if path.exists():
        model.load_state_dict(load_file(str(path), device=device))
        info.update(cached=True, seconds=0.0)
        return model.eval(), tok, info
    start = time.perf_counter()
    losses = _train(model, tok, config, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"config": json.dumps(asdict(config))})
    tmp.replace(path)
    info.update(cached=False, seconds=time.perf_counter() - start, final_loss=losses[-1])
    return model.eval(), tok, info


def _train(model, tok, config, device, progress) -> list[float]:
    from tqdm.auto import tqdm

    rng = random.Random(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.1)
    task = LanguageModelingTask()
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc="pretrain base LM", disable=not progress, leave=False)
    for _ in bar:
        batch = collate(tok, [corpus_example(rng) for _ in range(config.batch_size)])
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
