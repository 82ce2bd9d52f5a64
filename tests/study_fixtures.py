"""Generated prompt/response/label data and tiny saved HuggingFace models for the study tests.

Nothing is downloaded: models are built from configs with random weights and saved with
their tokenizer (word level, trained by the ``tokenizers`` library on the fixture's text).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

EMOTIONS = {
    "joy": ("delighted", "smiling", "laughing", "grateful"),
    "anger": ("furious", "shouting", "outraged", "yelling"),
    "fear": ("trembling", "terrified", "nervous", "shaking"),
}
SUBJECTS = ("my sister", "the boy", "our teacher", "the old man", "my friend")
EVENTS = ("saw the letter", "came home", "heard the news", "opened the door")


def rows(n_per_class: int, seed: int) -> list[dict]:
    """``n_per_class`` rows per emotion: a sentence → the emotion's name, label = the name."""
    rng = random.Random(seed)
    out = []
    for label, words in EMOTIONS.items():
        for _ in range(n_per_class):
            prompt = f"{rng.choice(SUBJECTS)} was {rng.choice(words)} when they {rng.choice(EVENTS)} ."
            out.append({"prompt": prompt, "response": label, "label": label})
    rng.shuffle(out)
    return out


def write_split(folder: Path, split: str, data: list[dict], fmt: str, fields=("prompt", "response", "label")) -> None:
    """Writes ``data`` as ``folder/<split>`` in format ``arrow``, ``jsonl`` or ``csv``."""
    renamed = [{new: row[old] for old, new in zip(("prompt", "response", "label"), fields)} for row in data]
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "arrow":
        import datasets

        datasets.Dataset.from_list(renamed).save_to_disk(str(folder / split))
    elif fmt == "jsonl":
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    else:
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields))
            writer.writeheader()
            writer.writerows(renamed)


def write_data(folder: Path, fmt: str, n_train: int = 6, n_test: int = 2, **kw) -> Path:
    write_split(folder, "train", rows(n_train, 0), fmt, **kw)
    write_split(folder, "test", rows(n_test, 1), fmt, **kw)
    return folder


def save_tiny_model(folder: Path, kind: str) -> Path:
    """A tiny ``llama`` or ``gpt2`` causal LM and its tokenizer, saved to ``folder``."""
    import torch
    import transformers

    from influence.study.models import train_word_tokenizer

    texts = [f"{r['prompt']} {r['response']}" for r in rows(6, 0) + rows(2, 1)]
    tokenizer = train_word_tokenizer(texts)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=64, **ids)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **ids)
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
