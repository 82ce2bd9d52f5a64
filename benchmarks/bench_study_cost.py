"""What ``influence study`` costs per training example, as the model grows (for docs/study.md).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_study_cost.py       # writes results/
    PYTHONPATH=. python benchmarks/bench_study_cost.py --smoke                 # tiny, for CI

Runs :func:`influence.study.run_study` (the default methods identity, datainf, lissa_paper,
repsim; both controls; one fine-tuning epoch) on generated prompt/response data with random
Llama-architecture models of growing width, and reports per training example the seconds of
each stage (``results["timings"]``) and their ratio to one fine-tuning epoch. The ratio,
"attribution ≈ K fine-tuning epochs", is what carries over to other hardware and sizes: both
are dominated by forward and backward passes of the same model on the same tokens (the
per-example LoRA gradients add ``B·P`` bytes, tiny next to the model). docs/study.md turns it
into an estimate for a 7B model.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from _common import RESULTS, environment, write
from influence.study import StudyConfig, run_study
from influence.study.models import train_word_tokenizer

WORDS = [f"w{i}" for i in range(400)]
CLASSES = ("alpha", "beta", "gamma")


def make_data(folder: Path, n_per_class: int, n_test_per_class: int, words: int, seed: int = 0) -> None:
    """Prompts of ``words`` random words (a class-specific word planted), response = class."""
    import json

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_per_class), ("test", n_test_per_class)):
        lines = []
        for c, label in enumerate(CLASSES):
            for _ in range(n):
                prompt = [rng.choice(WORDS) for _ in range(words)]
                prompt[rng.randrange(words)] = f"cue{c}"
                lines.append(json.dumps({"prompt": " ".join(prompt), "response": label, "label": label}))
        rng.shuffle(lines)
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def save_llama(folder: Path, hidden: int, layers: int) -> int:
    """A random Llama of width ``hidden`` with a tokenizer of the data; returns its
    non-embedding parameter count."""
    import transformers

    texts = [" ".join(WORDS + [f"cue{c}" for c in range(3)] + list(CLASSES))]
    tok = train_word_tokenizer(texts)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=int(2.6875 * hidden), num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=256, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def run(smoke: bool = False, out_dir: Path = RESULTS) -> dict:
    sizes = [(32, 1)] if smoke else [(128, 2), (256, 2), (512, 2), (1024, 2)]
    n_per_class, words = (4, 12) if smoke else (16, 48)
    rows, cases = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data", n_per_class, 2, words)
        for hidden, layers in sizes:
            n_params = save_llama(tmp / f"llama{hidden}", hidden, layers)
            result = run_study(StudyConfig(data=str(tmp / "data"), model=str(tmp / f"llama{hidden}"),
                                           epochs=1, batch_size=8), log=lambda s: None)
            r = result.results
            n_train, t = r["data"]["n_train"], r["timings"]
            tokens = sum(r["data"]["train_lengths"]) / n_train
            epoch = t["finetune"]
            case = {"hidden": hidden, "layers": layers, "non_embedding_params": n_params,
                    "lora_params": r["model"]["num_lora_params"], "n_train": n_train,
                    "n_queries": r["data"]["n_queries"], "tokens_per_example": tokens, "timings": t,
                    "method_seconds": {m: e.get("seconds") for m, e in r["methods"].items()}}
            cases[f"llama{hidden}x{layers}"] = case
            rows.append({"model": f"llama h={hidden} L={layers}", "params (non-emb)": n_params,
                         "LoRA params": case["lora_params"], "tokens/example": tokens,
                         "fine-tune s/example/epoch": epoch / n_train,
                         "attribution s/example": t["attribution"] / n_train,
                         "control before s/example": t["control_before_finetuning"] / n_train,
                         "attribution / epoch": t["attribution"] / epoch,
                         "control before / epoch": t["control_before_finetuning"] / epoch})
    payload = {"environment": environment(), "smoke": smoke, "cases": cases}
    name = "bench_study_cost_smoke" if smoke else "bench_study_cost"
    write(name, payload, rows, out_dir, notes=(
        "One fine-tuning epoch includes the query-loss pass. 'attribution' covers the default "
        "methods on the fine-tuned model and the swapped-response control; 'control before' "
        "the same methods on the model before fine-tuning."))
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    out = run(smoke=args.smoke)
    for key, case in out["cases"].items():
        print(key, case["timings"], case["method_seconds"])
