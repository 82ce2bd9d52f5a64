"""K-FAC/EK-FAC on a tiny GPT-2 (local config, random weights): HF Conv1D layers are covered.

Needs transformers; skipped when it is not importable. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from influence import EKFAC, KFAC, FallbackWarning, InfluenceEstimator, LanguageModelingTask  # noqa: E402
from oracles import loop_grads  # noqa: E402
from test_hf import VOCAB, gpt2  # noqa: E402
from test_kfac_factors import naive_factors  # noqa: E402
from zoo import dict_batches, lm_batch  # noqa: E402

CONV1D = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


def fit(cls, model, batch, **kw):
    with pytest.warns(FallbackWarning) as record:
        cur = cls(fisher_type="empirical", **kw).fit(model, LanguageModelingTask(), dict_batches(batch, 2))
    (message,) = [str(w.message) for w in record if w.category is FallbackWarning]
    return cur, message


def test_ekfac_covers_gpt2_conv1d_and_its_corrections_equal_the_naive_projection():
    model = gpt2()
    task = LanguageModelingTask()
    batch = lm_batch(n=3, T=6, vocab=VOCAB, labels=True)  # right padding, -100 prompt labels
    cur, message = fit(EKFAC, model, batch)
    for name in CONV1D + ["transformer.wpe"]:  # wpe: (1, T) position ids, expanded per example
        assert cur.coverage_[name]["method"] == "kronecker", name
        assert name + " " not in message
    falling = sorted(k for k, v in cur.coverage_.items() if v["method"] != "kronecker")
    assert falling == ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.ln_f", "transformer.wte"]
    assert "transformer.wte (Embedding, weight tied with lm_head (Linear): per-example gradients summed" in message
    G = loop_grads(model, task.loss, batch, list(cur.layout_.names))
    kron = [b for b in cur.blocks_ if b.method == "kronecker"]
    assert {b.info.name for b in kron} == set(CONV1D) | {"transformer.wpe"}
    for block in kron:
        info = block.info
        if info.kind == "conv1d":
            assert info.transposed and block.eigenvalues.shape == (info.d_out, info.d_in + 1)
        rotated = block.rotate(block.to_matrix(G))
        torch.testing.assert_close(block.eigenvalues, rotated.pow(2).mean(0), rtol=1e-9, atol=1e-12)
        X = torch.zeros_like(G)
        block.from_matrix(block.to_matrix(G), X)  # the matrix view is a permutation of the block
        idx = torch.cat([torch.arange(s.start, s.stop) for n, s in cur.layout_.slices().items() if n in block.names])
        torch.testing.assert_close(X[:, idx], G[:, idx], rtol=0, atol=0)


@pytest.mark.parametrize("name", CONV1D[::3] + ["transformer.wpe"])
def test_kfac_factors_of_gpt2_conv1d_equal_naive_covariances(name):
    model = gpt2()
    batch = lm_batch(n=3, T=6, vocab=VOCAB, labels=True)
    cur, _ = fit(KFAC, model, batch)
    st = cur.statistics_
    A, S = st[f"{name}/A"] / st[f"{name}/A_count"], st[f"{name}/S"] / st[f"{name}/S_count"]
    if name == "transformer.wpe":  # one-hot positions: A is the frequency of non-padding positions
        mask = batch["attention_mask"].to(torch.float64)
        torch.testing.assert_close(A, torch.cat([mask.sum(0), torch.zeros(16 - mask.shape[1], dtype=torch.float64)]) / mask.sum())
        return
    A0, S0 = naive_factors(model, LanguageModelingTask(), batch, name, mask=batch["attention_mask"])
    torch.testing.assert_close(A, A0)
    torch.testing.assert_close(S, S0)


def test_gpt2_ekfac_save_load_round_trip(tmp_path):
    model = gpt2()
    train = dict_batches(lm_batch(n=3, T=6, vocab=VOCAB, labels=True), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        est = InfluenceEstimator(EKFAC(damping=0.1), LanguageModelingTask(), score_dtype=torch.float64).fit(model, train)
    est.save(tmp_path / "gpt2.safetensors")
    loaded = InfluenceEstimator.load(tmp_path / "gpt2.safetensors", model)
    torch.testing.assert_close(loaded.pairwise_scores(train[:1], train), est.pairwise_scores(train[:1]), rtol=0, atol=0)
