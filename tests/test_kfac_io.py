"""KFAC, EKFAC and Diagonal: save/load round trips and checkpointed (resumable) fits."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import zoo
from influence import EKFAC, KFAC, ClassificationTask, Diagonal, FallbackWarning, InfluenceEstimator, LanguageModelingTask

DT = torch.float64


def problem(name):
    if name == "lm":  # LayerNorms fall back to the diagonal, ln_f to the identity
        model = zoo.tiny_lm(n_layers=1, d_model=4, d_ff=6, vocab=7)
        return model, LanguageModelingTask(), zoo.dict_batches(zoo.lm_batch(n=5, T=5, vocab=7), 2)
    x, y = zoo.classification_data(n=7)
    return zoo.mlp(hidden=(5, 4)), ClassificationTask(), zoo.batches(x, y, 3)


CURVATURES = {
    "kfac": lambda: KFAC(damping=0.1, fisher_type="true", num_samples=2, fallback={"ln_f": "identity"}),
    "ekfac": lambda: EKFAC(damping=0.1, fisher_type="empirical", fallback={"ln_f": "identity"}),
    "diagonal": lambda: Diagonal(damping=0.1, fisher_type="true"),
    # exact expectation on the MLP; on the LM it falls back to 2 sampled targets (fisher_plan_ and
    # num_examples_ must come back from the file)
    "ekfac_expected": lambda: EKFAC(damping=0.1, fisher_type="expected", num_samples=2, fallback={"ln_f": "identity"}),
    "diagonal_expected": lambda: Diagonal(damping=0.1, fisher_type="expected", num_samples=2),
}


@pytest.mark.parametrize("name", ["mlp", "lm"])
@pytest.mark.parametrize("which", sorted(CURVATURES))
def test_round_trip_gives_identical_scores(tmp_path, which, name):
    model, task, train = problem(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        est = InfluenceEstimator(CURVATURES[which](), task, score_dtype=DT).fit(model, train)
    est.save(tmp_path / "est.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # loading refits nothing and warns nothing
        loaded = InfluenceEstimator.load(tmp_path / "est.safetensors", model)
    cur, ref = loaded.curvature_, est.curvature_
    assert repr(loaded) == repr(est)
    assert cur.coverage_ == ref.coverage_ and cur.num_examples_ == ref.num_examples_ == sum(task.num_examples(b) for b in train)
    assert cur.fisher_plan_ == ref.fisher_plan_
    assert sorted(cur.statistics_) == sorted(ref.statistics_)
    assert [b.method for b in cur.blocks_] == [b.method for b in ref.blocks_]
    torch.testing.assert_close(loaded.pairwise_scores(train, train), est.pairwise_scores(train), rtol=0, atol=0)
    V = torch.randn(2, ref.layout_.num_params, dtype=DT)
    assert torch.equal(cur.solve(V), ref.solve(V))


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])  # true: sampled targets replay too
@pytest.mark.parametrize("cls", [EKFAC, Diagonal])
def test_interrupted_checkpointed_fit_resumes_identically(tmp_path, monkeypatch, cls, fisher_type):
    model, task, train = problem("lm")
    make = lambda: InfluenceEstimator(cls(damping=0.1, fisher_type=fisher_type), task, score_dtype=DT)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        fresh = make().fit(model, train)
        original = cls._batch_statistics
        calls = []

        def failing(self, model, task, batch, layout, pass_index):
            calls.append(pass_index)
            if len(calls) == cls._num_passes * len(train):  # the last batch of the last pass
                raise KeyboardInterrupt
            return original(self, model, task, batch, layout, pass_index)

        monkeypatch.setattr(cls, "_batch_statistics", failing)
        with pytest.raises(KeyboardInterrupt):
            make().fit(model, train, checkpoint_dir=tmp_path, checkpoint_every=1)
        assert os.listdir(tmp_path)  # checkpoints kept
        calls.clear()
        monkeypatch.setattr(cls, "_batch_statistics", lambda self, *a: calls.append(a[-1]) or original(self, *a))
        resumed = make().fit(model, train, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert calls == [cls._num_passes - 1]  # only the interrupted batch is recomputed
    assert os.listdir(tmp_path) == []
    for key, value in fresh.curvature_.statistics_.items():
        assert torch.equal(resumed.curvature_.statistics_[key], value), key
    torch.testing.assert_close(resumed.pairwise_scores(train[:1]), fresh.pairwise_scores(train[:1]), rtol=0, atol=0)
