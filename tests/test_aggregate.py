"""Aggregated queries: the mean (sum) of many queries scored as one, with one resident query."""

import numpy as np
import pytest
import torch

import zoo
from influence import KFAC, ClassificationTask, Exact, Identity, InfluenceEstimator, LanguageModelingTask
from influence.scoring import Scorer, ScoringConfig
from test_scoring import CASES, DiagScale

CURVATURES = {
    "identity": lambda: Identity(damping=0.5),
    "exact": lambda: Exact(damping=0.1),
    "kfac": lambda: KFAC(damping=0.1),
}


@pytest.mark.parametrize("case", ["mlp", "cnn", "lm"])
@pytest.mark.parametrize("curv", [pytest.param(c, marks=pytest.mark.slow) if c == "exact" else c for c in CURVATURES])
def test_aggregate_equals_the_mean_and_sum_of_the_rows(case, curv):
    model, task, test, train = CASES[case]()
    est = InfluenceEstimator(CURVATURES[curv](), task, score_dtype=torch.float64).fit(model, train)
    full = est.pairwise_scores(test)
    for how, expected in ((True, full.mean(0, keepdim=True)), ("mean", full.mean(0, keepdim=True)), ("sum", full.sum(0, keepdim=True))):
        agg = est.pairwise_scores(test, aggregate_queries=how)
        assert agg.shape == (1, full.shape[1])
        torch.testing.assert_close(agg, expected, rtol=1e-10, atol=1e-13)
    assert est.plan_["aggregate"] == "sum" and est.plan_["num_queries"] == full.shape[0]
    assert est.plan_["query_groups"] == 1 and est.plan_["group_size"] == 1
    for entry in est.plan_["layers"].values():  # ghost / low-rank factors would grow in rank
        assert entry["mode"] == "materialise"


@pytest.mark.parametrize("config", [ScoringConfig(strategy="factored", query_rank=2), ScoringConfig(projection="factored", projection_dim=4),
                                    ScoringConfig(projection="dense", projection_dim=16)])
def test_aggregate_under_projections_and_low_rank_settings(config):
    """Projections are linear: the aggregated row is the mean of the projected rows; a low-rank
    setting is overridden (the aggregated query is held dense and exact)."""
    model, task, test, train = CASES["lm"]()
    est = InfluenceEstimator(DiagScale(damping=0.1), task, score_dtype=torch.float64, scoring=config).fit(model, train)
    agg = est.pairwise_scores(test, aggregate_queries="mean")
    if config.projection is None:
        est.set_params(scoring=None)
    torch.testing.assert_close(agg, est.pairwise_scores(test).mean(0, keepdim=True), rtol=1e-10, atol=1e-13)


def lm_queries(n):
    return zoo.dict_batches(zoo.lm_batch(n=n, seed=7), 4)


def test_resident_query_memory_does_not_grow_with_the_number_of_queries(monkeypatch):
    model, task = zoo.tiny_lm(), LanguageModelingTask()
    train = zoo.dict_batches(zoo.lm_batch(n=6), 3)
    est = InfluenceEstimator(Identity(), task, score_dtype=torch.float64).fit(model, train)
    rows = []
    original = Scorer.score_batch
    monkeypatch.setattr(Scorer, "score_batch", lambda self, q, bg: rows.append(next(iter(next(iter(q.values())).values())).shape[0]) or original(self, q, bg))
    resident = {}
    for n in (4, 40):
        est.pairwise_scores(lm_queries(n), aggregate_queries=True)
        resident[n] = est.plan_["resident_query_bytes"]
        assert est.plan_["bytes_per_query"] == resident[n]
        est.pairwise_scores(lm_queries(n))
        assert est.plan_["resident_query_bytes"] >= n * resident[4] // 4  # not aggregated: grows
    assert resident[4] == resident[40] > 0
    assert set(rows[:2]) == {1} and set(rows[4:6]) == {1}  # every training batch met one query
    with pytest.raises(ValueError, match="cannot hold even one query"):
        est.set_params(scoring=ScoringConfig(max_memory=resident[4] - 1)).pairwise_scores(lm_queries(4), aggregate_queries=True)


def test_aggregate_top_k_and_score_file(tmp_path, monkeypatch):
    model = zoo.mlp(hidden=(5,))
    x, y = zoo.classification_data(n=13)
    train, test = zoo.batches(x, y, 4), zoo.batches(x[:6], y[:6], 4)
    est = InfluenceEstimator(Exact(damping=0.1), ClassificationTask(), score_dtype=torch.float64).fit(model, train)
    mean = est.pairwise_scores(test).mean(0, keepdim=True)
    values, indices = est.top_k(test, 3, aggregate_queries="mean")
    top = torch.topk(mean, 3, dim=1)
    torch.testing.assert_close(values, top.values)
    assert torch.equal(indices, top.indices)
    mm = est.pairwise_scores(test, out=tmp_path / "agg.npy", aggregate_queries="sum")
    assert mm.shape == (1, 13)
    np.testing.assert_allclose(np.asarray(mm), 6 * mean.numpy(), rtol=1e-12, atol=1e-14)

    calls, original = [], Scorer.score_batch

    def interrupted(self, q, bg):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(self, q, bg)

    monkeypatch.setattr(Scorer, "score_batch", interrupted)
    with pytest.raises(RuntimeError, match="killed"):
        est.pairwise_scores(test, out=tmp_path / "part.npy", aggregate_queries="sum", checkpoint_every=1)
    monkeypatch.setattr(Scorer, "score_batch", original)
    for other in ("mean", False):  # a partial file of another aggregation is refused
        with pytest.raises(Exception, match=r"written by another run \(different .*query aggregation"):
            est.pairwise_scores(test, out=tmp_path / "part.npy", aggregate_queries=other)
    resumed = est.pairwise_scores(test, out=tmp_path / "part.npy", aggregate_queries="sum")
    np.testing.assert_allclose(np.asarray(resumed), np.asarray(mm), rtol=1e-12, atol=1e-14)
