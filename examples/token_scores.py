"""Per-token influence: which training *tokens* made a tiny language model answer a question?

Trains the built-in :class:`influence.lm.TinyLM` briefly on generated question → answer text
(capitals, colours, animal sounds, opposites), fits EK-FAC on all its parameters, and splits
each training sequence's score on one query into its tokens
(``pairwise_scores(..., per_token=True)``: the score of token ``t`` is the query's
preconditioned gradient dotted with the gradient terms of the activations at ``t``, summed over
layers; the tokens of a sequence sum to its score). It prints the training sequences with the
largest scores, their most influential tokens in ``[brackets]`` (``-`` marks the most harmful
one), and the largest single-token contributions over the whole training set.

Runs in well under a minute on a laptop CPU: ``python examples/token_scores.py``.
"""

from __future__ import annotations

import random
import time

import torch

import influence
from influence.demo.data import Example, make_batches
from influence.demo.families import CAPITALS, COLORS, OPPOSITES, SOUNDS
from influence.demo.tokenizer import DemoTokenizer, train_tokenizer
from influence.lm import TinyLM, TinyLMConfig

FACTS = {
    "capital": ("what is the capital of {} ?", CAPITALS),
    "colour": ("what colour is the {} ?", COLORS),
    "sound": ("what does a {} say ?", SOUNDS),
    "opposite": ("what is the opposite of {} ?", OPPOSITES),
}


def make_examples(seed: int) -> list[Example]:
    """Every fact once, in a shuffled order (the answer is the response, the loss is on it)."""
    examples = [Example(template.format(key), value, k)
                for k, (template, table) in enumerate(FACTS.values()) for key, value in table.items()]
    random.Random(seed).shuffle(examples)
    return examples


def train(model: TinyLM, batches: list[dict], steps: int, seed: int) -> TinyLM:
    torch.manual_seed(seed)
    task, opt = influence.LanguageModelingTask(), torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad()
        (task.loss(model, batch).sum() / batch["input_ids"].shape[0]).backward()
        opt.step()
    return model.eval()


def highlight(tok: DemoTokenizer, ids: torch.Tensor, scores: torch.Tensor, top: int = 2) -> str:
    """The sequence's words, the ``top`` most helpful in ``[brackets]``, the most harmful ``-marked-``."""
    vocab = tok.vocab
    words = [vocab[int(i)] for i in ids if int(i) != tok.pad_id]
    best = set(torch.topk(scores[: len(words)], min(top, len(words))).indices.tolist())
    worst = int(torch.argmin(scores[: len(words)]))
    out = []
    for t, w in enumerate(words):
        out.append(f"[{w}]" if t in best else f"-{w}-" if t == worst and scores[t] < 0 else w)
    return " ".join(out)


def main(steps: int = 400, d_model: int = 32, seed: int = 0, show: int = 4,
         query: Example = Example("tell me the capital of peru ?", "lima", 0)) -> dict:
    """Trains, scores ``query`` (by default a paraphrase of a training question) token by
    token, prints the highlights; returns the per-token scores and what it printed from."""
    start = time.perf_counter()
    examples = make_examples(seed)
    tok = train_tokenizer([ex.text for ex in [*examples, query]], max_length=16)
    batches = make_batches(tok, examples, batch_size=8)
    model = TinyLM(TinyLMConfig(vocab_size=len(tok), d_model=d_model, n_layers=2, n_heads=4, d_ff=2 * d_model, max_len=16))
    train(model, batches, steps, seed)

    test = make_batches(tok, [query], batch_size=1)

    est = influence.InfluenceEstimator(influence.EKFAC(damping=1e-3), influence.LanguageModelingTask()).fit(model, batches)
    tokens = est.pairwise_scores(test, per_token=True)[0]  # (n_train, T)
    totals = tokens.sum(-1)
    print(f"query: {query.text!r}   (trained {steps} steps, {len(examples)} training sequences)")
    print(f"\ntraining sequences with the largest scores (tokens in [brackets] contributed most):")
    for j in torch.topk(totals, show).indices.tolist():
        ids = torch.cat([b["input_ids"] for b in batches])[j]
        print(f"  {totals[j]:+.3e}  {highlight(tok, ids, tokens[j])}")
    flat = torch.topk(tokens.flatten(), show)
    all_ids = torch.cat([torch.nn.functional.pad(b["input_ids"], (0, tokens.shape[1] - b["input_ids"].shape[1])) for b in batches])
    print("\nlargest single-token contributions:")
    for value, index in zip(flat.values.tolist(), flat.indices.tolist()):
        j, t = divmod(index, tokens.shape[1])
        print(f"  {value:+.3e}  token {tok.vocab[int(all_ids[j, t])]!r} of sequence {j}: {examples[j].text!r}")
    print(f"\n({time.perf_counter() - start:.1f} s; per-token scores sum to the sequence scores: "
          f"max difference {float((totals - est.pairwise_scores(test)[0]).abs().max()):.1e})")
    return {"tokens": tokens, "examples": examples, "query": query, "tokenizer": tok, "batches": batches}


if __name__ == "__main__":
    main()
