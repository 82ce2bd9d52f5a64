"""Out-of-core scores (memory-mapped .npy), streaming top-k, progress bars, logging, timings."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence import ClassificationTask, Identity, InfluenceEstimator, ScoringConfig
from influence.scoring import Scorer
from zoo import batches, classification_data, mlp


@pytest.fixture(scope="module")
def setup():
    model = mlp(d_in=3, hidden=(4,), d_out=3, seed=2)
    x, y = classification_data(n=11, d_in=3, classes=3, seed=3)
    est = InfluenceEstimator(Identity(), ClassificationTask(), score_dtype=torch.float64).fit(model, batches(x, y, 3))
    return est, x, y


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float64])
def test_memmap_file_equals_in_memory_scores(tmp_path, setup, score_dtype):
    est, x, y = setup
    est.set_params(score_dtype=score_dtype)
    try:
        test = batches(x[:5], y[:5], 2)
        loader = DataLoader(TensorDataset(x, y), batch_size=4)
        mm = est.pairwise_scores(test, loader, out=tmp_path / "sub" / "s.npy")
        assert isinstance(mm, np.memmap) and mm.shape == (5, 11) and mm.dtype == np.dtype(str(score_dtype).removeprefix("torch."))
        # the in-memory path scores through influence.scoring (ghost / per-layer accumulation), the
        # file path through flat factors: equal up to the rounding of the score dtype
        tol = 1e-5 if score_dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(np.asarray(mm), est.pairwise_scores(test, loader).numpy(), rtol=tol, atol=tol)
        np.testing.assert_array_equal(np.load(tmp_path / "sub" / "s.npy"), np.asarray(mm))
        assert os.listdir(tmp_path / "sub") == ["s.npy"]
    finally:
        est.set_params(score_dtype=torch.float64)


def test_memmap_is_written_in_column_blocks(tmp_path, setup, monkeypatch):
    """Each training batch writes its own columns; no (n_test, n_train) tensor is built."""
    est, x, y = setup
    widths = []
    real_cat = torch.cat

    def no_full_matrix(tensors, dim=0, **kw):
        out = real_cat(tensors, dim=dim, **kw)
        assert not (out.dim() == 2 and out.shape[1] == 11), "the full matrix was built in memory"
        return out

    monkeypatch.setattr(torch, "cat", no_full_matrix)
    original = Scorer.score_batch
    monkeypatch.setattr(Scorer, "score_batch", lambda *a: (lambda s: widths.append(s.shape) or s)(original(*a)))
    est.pairwise_scores([(x[:2], y[:2])], out=tmp_path / "s.npy")
    assert widths == [(2, 3), (2, 3), (2, 3), (2, 2)]


def test_streaming_top_k_matches_the_full_matrix(setup):
    est, x, y = setup
    test = [(x[:4], y[:4])]
    full = est.pairwise_scores(test)
    for largest in (True, False):
        values, indices = est.top_k(test, 5, largest=largest)
        expected = torch.topk(full, 5, dim=1, largest=largest)
        torch.testing.assert_close(values, expected.values, rtol=0, atol=0)
        assert torch.equal(torch.gather(full, 1, indices), values)
    with pytest.raises(ValueError, match="k=12 exceeds the number of training examples \\(11\\)"):
        est.top_k(test, 12)


def test_progress_bars_logger_and_timings(setup, capsys, caplog):
    est, x, y = setup
    train = batches(x, y, 3)
    with caplog.at_level(logging.INFO, logger="influence"):
        est2 = InfluenceEstimator(Identity(), ClassificationTask(), progress=True).fit(est.model_, train)
        est2.pairwise_scores([(x[:2], y[:2])])
    err = capsys.readouterr().err
    assert "train gradients" in err and "/4 [" in err
    assert any(r.name == "influence" and "pairwise_scores took" in r.getMessage() for r in caplog.records)
    assert {"fit", "influence_factors", "pairwise_scores"} <= set(est2.timings_)
    assert all(v >= 0 for v in est2.timings_.values())
    est2.set_params(progress=False)
    est2.self_scores()
    assert capsys.readouterr().err == ""
    assert "self_scores" in est2.timings_


def test_out_honours_max_memory_and_reports_the_plan(tmp_path, setup):
    """Issue 13.18: with out= the budget was silently ignored (no warning, plan_ None)."""
    est, x, y = setup
    test = batches(x[:5], y[:5], 2)
    full = est.pairwise_scores(test).numpy()
    per_query = est.plan_["bytes_per_query"]
    budget = int(per_query * 2.5)
    est.set_params(scoring=ScoringConfig(max_memory=budget))
    try:
        with pytest.warns(UserWarning, match=r"split into 3 groups of at most 2 queries"):
            mm = est.pairwise_scores(test, out=tmp_path / "s.npy")
        plan = est.plan_
        assert plan["query_groups"] == 3 and plan["group_size"] == 2 and plan["max_memory"] == budget
        assert plan["resident_query_bytes"] == 2 * per_query <= budget
        np.testing.assert_allclose(np.asarray(mm), full, rtol=1e-12, atol=1e-14)  # the unbudgeted scores (BLAS blocking aside)
        est.set_params(scoring=ScoringConfig(max_memory=8))
        with pytest.raises(ValueError, match="cannot hold even one query"):
            est.pairwise_scores(test, out=tmp_path / "t.npy")
    finally:
        est.set_params(scoring=None)


@pytest.mark.parametrize("to_file", [False, True])
def test_one_group_of_queries_is_resident(tmp_path, setup, monkeypatch, to_file):
    """When a query group is allocated, no tensor of an earlier group is alive any more (the
    file path used to hold about three copies of all queries)."""
    import weakref

    import influence.scoring as scoring

    est, x, y = setup
    test = batches(x[:6], y[:6], 4)  # groups of 2 cut across the query batches
    earlier, allocated = [], []
    original = scoring._Group.__init__

    def init(self, block, size):
        assert all(r() is None for r in earlier), "an earlier query group is still resident"
        original(self, block, size)
        earlier.extend(weakref.ref(t) for e in self.parts.values() for t in e.values())
        allocated.append(size)

    full = est.pairwise_scores(test).numpy()
    per_query = est.plan_["bytes_per_query"]
    monkeypatch.setattr(scoring._Group, "__init__", init)
    est.set_params(scoring=ScoringConfig(max_memory=2 * per_query))
    try:
        with pytest.warns(UserWarning, match="split into 3 groups"):
            got = est.pairwise_scores(test, out=tmp_path / "s.npy") if to_file else est.pairwise_scores(test)
        assert allocated == [2, 2, 2]
    finally:
        est.set_params(scoring=None)
    np.testing.assert_allclose(np.asarray(got), full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("order", ["short first", "long first"])
def test_ghost_queries_of_different_lengths_share_a_group(tmp_path, order):
    """Ghost factors (Identity on an LM: the query's own per-token factors) of query batches
    with different sequence lengths are zero-padded into one group (grown when a longer batch
    follows): the same scores as each batch scored alone, in memory and to a file."""
    import zoo
    from influence import LanguageModelingTask

    model = zoo.tiny_lm(seed=1)
    train = zoo.dict_batches(zoo.lm_batch(n=4, T=8, seed=2), 2)
    short, long = zoo.lm_batch(n=2, T=5, seed=3, lengths=[5, 3]), zoo.lm_batch(n=3, T=8, seed=4)
    test = [short, long] if order == "short first" else [long, short]
    cfg = ScoringConfig(strategy="factored")
    est = InfluenceEstimator(Identity(), LanguageModelingTask(), score_dtype=torch.float64, scoring=cfg).fit(model, train)
    alone = torch.cat([est.pairwise_scores([b]) for b in test])
    together = est.pairwise_scores(test)
    assert {e["form"] for e in est.plan_["layers"].values() if e["kind"] == "linear"} == {"ghost (exact)"}
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(est.pairwise_scores(test, out=tmp_path / "s.npy")), together.numpy())
