"""A HuggingFace causal LM fine-tuned with LoRA (peft): which fine-tuning examples explain an answer?

The study's setting (Li et al. 2024, arXiv 2409.19998) in seconds and offline: a GPT-2 built
from a small ``GPT2Config`` (random weights, nothing downloaded) is first trained on all of
generated question → answer facts of four families (capitals, colours, animal sounds,
opposites; a stand-in for pretraining), then fine-tuned with peft LoRA (``r = 4`` on the
attention's ``c_attn``) on them. Influence is computed on the LoRA parameters only (peft
freezes the rest, and ``params="trainable"`` is the default), with EK-FAC and the
``LanguageModelingTask`` (dict batches with ``input_ids``, ``attention_mask``, ``labels``;
loss = the sum of next-token cross-entropy over the answer tokens).

Queries are paraphrases of training questions. As in the study, an attribution is right when
the top training example has the query's family; the example prints that accuracy (``Acc``)
for EK-FAC influence, gradient similarity (no curvature) and RepSim (cosine similarity of the
final hidden states), and the top training examples of one query.

Needs the ``hf`` extra (``pip install -e ".[hf]"``). Runs in under a minute on a laptop CPU:
``python examples/lora_lm.py``.
"""

from __future__ import annotations

import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config: nothing to download

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import influence  # noqa: E402
from influence.demo.data import Example, make_batches  # noqa: E402
from influence.demo.tokenizer import train_tokenizer  # noqa: E402
from influence.demo.families import CAPITALS, COLORS, OPPOSITES, SOUNDS  # noqa: E402
from influence.evaluation import top1_accuracy  # noqa: E402

# family: (training question, paraphrased query, facts)
FAMILIES = {
    "capital": ("what is the capital of {} ?", "name the capital city of {} ?", CAPITALS),
    "colour": ("what colour is the {} ?", "which colour does the {} have ?", COLORS),
    "sound": ("what does a {} say ?", "which sound does a {} make ?", SOUNDS),
    "opposite": ("what is the opposite of {} ?", "name the opposite word of {} ?", OPPOSITES),
}


def make_data(seed: int, queries_per_family: int) -> tuple[list[Example], list[Example]]:
    """Every fact once as a training example; paraphrased questions about some of them as queries."""
    train, queries = [], []
    rng = random.Random(seed)
    for label, (question, paraphrase, facts) in enumerate(FAMILIES.values()):
        train += [Example(question.format(key), value, label) for key, value in facts.items()]
        keys = rng.sample(sorted(facts), queries_per_family)
        queries += [Example(paraphrase.format(key), facts[key], label) for key in keys]
    rng.shuffle(train)
    return train, queries


def fit_steps(model, batches: list[dict], steps: int, lr: float, seed: int):
    torch.manual_seed(seed)
    task = influence.LanguageModelingTask()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad()
        (task.loss(model, batch).sum() / batch["input_ids"].shape[0]).backward()
        opt.step()
    return model.eval()  # eval mode: no dropout during attribution


def main(pretrain_steps: int = 300, finetune_steps: int = 150, d_model: int = 32,
         queries_per_family: int = 4, seed: int = 0) -> dict:
    """Trains, fine-tunes with LoRA, attributes the queries; returns each method's ``Acc``."""
    start = time.perf_counter()
    train, queries = make_data(seed, queries_per_family)
    tok = train_tokenizer([ex.text for ex in [*train, *queries]])
    batches = make_batches(tok, train, batch_size=8)   # in order: scores line up with `train`
    query_batches = make_batches(tok, queries, batch_size=8)

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_positions=32, n_embd=d_model, n_layer=2, n_head=4,
        bos_token_id=tok.pad_id, eos_token_id=tok.pad_id, attn_implementation="eager",
    )
    base = fit_steps(transformers.GPT2LMHeadModel(config), batches, pretrain_steps, 3e-3, seed)
    lora = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"], lora_dropout=0.0,
                           fan_in_fan_out=True)  # GPT-2's Conv1D stores weights transposed
    model = fit_steps(peft.get_peft_model(base, lora), batches, finetune_steps, 1e-2, seed + 1)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"GPT-2 ({sum(p.numel() for p in model.parameters()):,} parameters) fine-tuned with LoRA "
          f"({n_lora:,} trainable) on {len(train)} facts; {len(queries)} paraphrased queries")

    task = influence.LanguageModelingTask()
    methods = {
        "EK-FAC influence": influence.InfluenceEstimator(influence.EKFAC(damping=1e-3), task),
        "gradient similarity": influence.InfluenceEstimator(influence.Identity(), task),
        "RepSim": influence.RepresentationSimilarity(layer="base_model.model.transformer.ln_f", task=task),
    }
    train_labels, query_labels = [ex.label for ex in train], [ex.label for ex in queries]
    acc, scores = {}, {}
    for name, method in methods.items():
        scores[name] = method.fit(model, batches).pairwise_scores(query_batches)  # (n_queries, n_train)
        acc[name] = top1_accuracy(scores[name], train_labels, query_labels)
        print(f"{name:>20}: Acc {acc[name]:.2f} (top training example of the query's family; chance 0.25)")

    q = 0
    top = torch.topk(scores["EK-FAC influence"][q], 3).indices.tolist()
    print(f"\nquery {queries[q].text!r}: most helpful fine-tuning examples (EK-FAC):")
    for j in top:
        print(f"  {scores['EK-FAC influence'][q, j]:+.3e}  {train[j].text!r}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return {"acc": acc, "scores": scores, "train": train, "queries": queries, "num_lora_params": n_lora}


if __name__ == "__main__":
    main()
