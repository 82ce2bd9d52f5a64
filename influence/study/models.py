"""The base model and tokenizer of a study: a HuggingFace causal LM, or the built-in TinyLM.

- ``--model PATH_OR_ID``: ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` (a
  local folder, or a hub id, which transformers downloads and caches; set
  ``HF_HUB_OFFLINE=1`` to forbid downloads).
- no ``--model``: :func:`tinylm_base`, the built-in :class:`~influence.lm.TinyLM` with a
  word-level tokenizer trained by the ``tokenizers`` library, both fitted to the training
  split's text, so ``influence study --data DIR`` runs offline on any data. Its "before
  fine-tuning" control is the same architecture at random initialisation (the pretraining
  corpus *is* the training split, so the pretrained model has already seen the answers).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from typing import Sequence

import torch

from ..demo.pretrain import PretrainConfig, train_steps
from ..lm import TinyLM, TinyLMConfig
from .batches import collate, encode, pad_id
from .data import STUDY_EXTRA, Record

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Invalid dtype {name!r}. Supported: {tuple(DTYPES)}.")
    return DTYPES[name]


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"influence study needs the optional dependency transformers, which is not "
            f"installed. Install it with {STUDY_EXTRA}."
        ) from error
    return transformers


def load_hf(model_id: str, dtype: str = "float32", device: str = "cpu", progress: bool = False):
    """``(model, tokenizer)`` of a HuggingFace causal LM, in eval mode on ``device``.

    The model is loaded with ``attn_implementation="eager"`` (written-out attention), which
    ``torch.func.vmap`` runs, so per-example gradients are vectorised.
    """
    transformers = _transformers()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_id, dtype=check_dtype(dtype), attn_implementation="eager")
    except OSError as error:
        raise OSError(
            f"Could not load --model {model_id!r} with AutoModelForCausalLM/AutoTokenizer: "
            f"{error}. Pass a local folder written by save_pretrained (model and tokenizer) or "
            "a hub id of a causal language model."
        ) from error
    return model.to(device).eval(), tokenizer


def train_word_tokenizer(texts: Sequence[str], vocab_size: int = 8000):
    """The demo's word-level tokenizer (:func:`influence.demo.tokenizer.train_tokenizer`:
    ``tokenizers`` library, punctuation split, ``<unk>`` for unseen words) trained on ``texts``,
    as a ``PreTrainedTokenizerFast`` that prepends ``<bos>`` (what the HF-model path expects)."""
    transformers = _transformers()
    from tokenizers import processors

    from ..demo.tokenizer import train_tokenizer

    core = train_tokenizer(texts, vocab_size=vocab_size).tokenizer
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", core.token_to_id("<bos>"))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>")


def tinylm_base(records: Sequence[Record], config: PretrainConfig, device: str = "cpu",
                dtype: str = "float32", progress: bool = False, queries: Sequence[Record] = (),
                max_length: int = 512):
    """``(model, tokenizer, info)``: the built-in TinyLM pretrained on the records' text.

    The single place where the study builds its default model (the adapter to the demo's
    pretraining). Pretraining: ``config.steps`` AdamW steps with a one-cycle schedule on random
    batches of the records (prompt and response), full-sequence next-token loss with padding
    masked. The position table covers the longest of ``records`` and ``queries`` (at most
    ``max_length`` tokens). ``info["config"]`` rebuilds the architecture (see :func:`random_tinylm`).
    """
    start = time.perf_counter()
    tokenizer = train_word_tokenizer([f"{r.prompt} {r.response}" for r in records])
    encoded = [encode(tokenizer, r, max_length) for r in records]
    longest = max(len(encode(tokenizer, r, max_length)[0]) for r in (*records, *queries))
    model_config = TinyLMConfig(
        vocab_size=len(tokenizer), d_model=config.d_model, n_layers=config.n_layers,
        n_heads=config.n_heads, d_ff=config.d_ff, max_len=longest)
    torch.manual_seed(config.seed)
    model = TinyLM(model_config).to(device=device, dtype=check_dtype(dtype))
    rng, pad = random.Random(config.seed), pad_id(tokenizer)
    losses = train_steps(
        model, config,
        lambda: collate([encoded[rng.randrange(len(encoded))] for _ in range(config.batch_size)],
                        pad, "response"),
        device, progress, "pretrain TinyLM")
    info = {"kind": "tinylm", "config": model_config.to_dict(), "pretrain": asdict(config),
            "num_params": sum(p.numel() for p in model.parameters()),
            "final_pretrain_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - start}
    return model.eval(), tokenizer, info


def random_tinylm(info: dict, seed: int, device: str = "cpu", dtype: str = "float32") -> TinyLM:
    """The TinyLM of ``info`` at random initialisation (the "before fine-tuning" control)."""
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(**info["config"])).to(device=device, dtype=check_dtype(dtype)).eval()
