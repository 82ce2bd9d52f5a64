"""A run killed midway (SIGKILL in a subprocess) resumes where it stopped, identically; a
resume with other data, batching or queries is refused, saying what differs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import _resume_worker as worker
from influence import EKFAC, ClassificationTask, Exact, InfluenceError, InfluenceEstimator
from influence.io import load_tensors
from influence.scoring import Scorer
from zoo import batches, classification_data

HERE = os.path.dirname(__file__)


def run_killed(mode, directory, k):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_resume_worker.py"), mode, str(directory), str(k)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.slow
def test_killed_fit_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    run_killed("fit", tmp_path, 5)  # batches 0-4 done, checkpoint after batch 4 (every 2)
    (path,) = [tmp_path / f for f in os.listdir(tmp_path) if f != ".lock"]  # a killed run leaves its (released) lock file
    _, meta = load_tensors(path, "fit-checkpoint")
    assert meta["batches"] == 4 and not meta["complete"]
    assert meta["data"]["sizes"] == [[2, 4]] and meta["data"]["examples"] == 8

    model, train, _ = worker.problem()
    calls = []
    original = Exact._batch_statistics
    monkeypatch.setattr(Exact, "_batch_statistics", lambda self, *a: calls.append(1) or original(self, *a))
    resumed = worker.fit_estimator().fit(model, train, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert len(calls) == 2  # only batches 4 and 5 recomputed
    assert os.listdir(tmp_path) == []  # checkpoints removed after a complete fit
    monkeypatch.undo()
    fresh = worker.fit_estimator().fit(model, train)
    assert torch.equal(resumed.curvature_.matrix_, fresh.curvature_.matrix_)
    assert resumed.curvature_.num_examples_ == 12


def test_checkpoint_of_another_run_is_refused(tmp_path):
    model, train, _ = worker.problem()
    est = worker.fit_estimator()
    from influence._fitting import _checkpoint_path, _save_checkpoint

    from influence._fingerprint import ConsumedData

    _save_checkpoint(_checkpoint_path(str(tmp_path), Exact(), 0), "another-key", {}, ConsumedData(), False)
    with pytest.raises(InfluenceError, match="belongs to another run.*Delete it"):
        est.fit(model, train, checkpoint_dir=tmp_path)
    other = InfluenceEstimator(Exact(damping=0.2, curvature_type="ggn"), ClassificationTask())
    interrupted(lambda loader: other.fit(model, loader, checkpoint_dir=tmp_path / "c", checkpoint_every=2), train, 3)
    with pytest.raises(InfluenceError, match=r"another run \(different curvature parameters\)"):  # says what differs
        est.fit(model, train, checkpoint_dir=tmp_path / "c", checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        est.fit(model, train, checkpoint_dir=tmp_path, checkpoint_every=0)


@pytest.mark.slow
def test_killed_scoring_resumes_its_columns(tmp_path, monkeypatch):
    run_killed("score", tmp_path, 3)  # batches 0-2 written, progress saved after batch 2
    assert sorted(os.listdir(tmp_path)) == ["scores.npy.lock", "scores.npy.partial", "scores.npy.resume"]
    progress = json.loads((tmp_path / "scores.npy.resume" / "progress-rank0of1.json").read_text())
    assert progress["group"] == 0 and progress["data"]["batches"] == 2 and progress["data"]["examples"] == 4

    model, train, test = worker.problem()
    est = worker.score_estimator(model, train)
    calls = []
    original = Scorer.score_batch
    monkeypatch.setattr(Scorer, "score_batch", lambda *a: calls.append(1) or original(*a))
    mm = est.pairwise_scores(test, train, out=tmp_path / "scores.npy", checkpoint_every=2)
    assert len(calls) == 4  # batches 2..5 (batch 2 was done but not yet checkpointed)
    assert os.listdir(tmp_path) == ["scores.npy"]
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    uninterrupted = est.pairwise_scores(test, train, out=tmp_path / "again.npy")
    np.testing.assert_array_equal(np.asarray(mm), np.asarray(uninterrupted))  # resumed == uninterrupted
    # the same scorer as in memory: the same numbers
    np.testing.assert_array_equal(np.asarray(mm), est.pairwise_scores(test).numpy())


class Interrupt(Exception):
    pass


def interrupted(run, items, k, on_pass=1):
    """Runs ``run(loader)`` with a loader that raises :class:`Interrupt` (a crash without
    killing the test process) when batch ``k`` of pass ``on_pass`` is requested."""

    def stop():
        raise Interrupt

    with pytest.raises(Interrupt):
        run(worker.At(items, k, on_pass, stop))


def other_data(n=12, seed=9):
    return classification_data(n=n, d_in=3, classes=2, seed=seed)


def test_fit_resume_with_other_data_or_batching_is_refused(tmp_path):
    """Issue 13.6: same-size other data mixed (max diff 0.018) and another batch size counted
    examples twice or skipped them (num_examples_ 120 or 48 instead of 96)."""
    model, train, _ = worker.problem()
    x, y = torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])
    fit = lambda loader: worker.fit_estimator().fit(model, loader, checkpoint_dir=tmp_path, checkpoint_every=2)  # noqa: E731
    interrupted(fit, train, 3)  # batches 0-1 checkpointed (4 examples)
    (ckpt,) = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    x2, y2 = other_data()
    with pytest.raises(InfluenceError, match=r"other data: the first 2 batches have the checkpoint's sizes but other contents.*delete .*fit-Exact-pass0"):
        fit(batches(x2, y2, 2))
    with pytest.raises(InfluenceError, match=r"other batching: the checkpoint's first 2 batches held 4 examples in batches of \[2×2\]; this loader's first 2 hold 8 in batches of \[4×2\].*count examples twice or skip"):
        fit(batches(x, y, 4))
    with pytest.raises(InfluenceError, match=r"other batching.*\[1×2\]"):
        fit(batches(x, y, 1))
    with pytest.raises(InfluenceError, match=r"fewer batches: the loader ended after 1 batches \(2 examples in batches of \[2\]\); the checkpoint's 2 held 4"):
        fit(train[:1])
    assert sorted(os.listdir(tmp_path)) == [ckpt]  # refused, kept (nothing lost), lock released
    resumed = fit(train)
    fresh = worker.fit_estimator().fit(model, train)
    assert torch.equal(resumed.curvature_.matrix_, fresh.curvature_.matrix_) and resumed.curvature_.num_examples_ == 12
    assert os.listdir(tmp_path) == []


def test_completed_pass_is_checked_before_the_next_pass_resumes(tmp_path):
    """A two-pass fit (EK-FAC) killed in pass 1 re-reads pass 0's data: other data is refused."""
    model, train, _ = worker.problem()
    est = lambda: InfluenceEstimator(EKFAC(damping=0.1), ClassificationTask(), score_dtype=torch.float64)  # noqa: E731
    fit = lambda loader: est().fit(model, loader, checkpoint_dir=tmp_path, checkpoint_every=2)  # noqa: E731
    interrupted(fit, train, 3, on_pass=2)  # the format check reads once, pass 0 completes, pass 1 stops
    x2, y2 = other_data()
    with pytest.raises(InfluenceError, match="EKFAC-pass0.*other data"):
        fit(batches(x2, y2, 2))
    with pytest.raises(InfluenceError, match="EKFAC-pass0.*more batches: the loader yields more than the 6 batches"):
        fit(train + train[:1])
    resumed = fit(train)
    fresh = est().fit(model, train)
    for name, v in fresh.curvature_.statistics_.items():
        assert torch.equal(resumed.curvature_.statistics_[name], v), name


def test_scoring_resume_with_other_training_data_or_batching_is_refused(tmp_path):
    """Issue 13.6: a resumed out= kept 48/96 old columns with other data of the same size, and
    left 40/96 columns as exact zeros with batch size 8 -> 16."""
    model, train, test = worker.problem()
    est = worker.score_estimator(model, train)
    out = tmp_path / "s.npy"
    score = lambda loader: est.pairwise_scores(test, loader, out=out, checkpoint_every=2)  # noqa: E731
    interrupted(score, train, 5)  # the first pass counts the examples; batches 0-3 recorded
    x2, y2 = other_data()
    with pytest.raises(InfluenceError, match=r"Cannot resume .*s.npy.partial.*other data: the first 4 batches.*Delete .*s.npy.partial and .*s.npy.resume"):
        score(batches(x2, y2, 2))
    x, y = torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])
    with pytest.raises(InfluenceError, match=r"other batching: the checkpoint's first 4 batches held 8 examples in batches of \[2×4\]; this loader's first 3 hold 12 in batches of \[4×3\]"):
        score(batches(x, y, 4))
    with pytest.raises(InfluenceError, match=r"another run \(different number of training examples\)"):
        score(train[:5])
    assert sorted(os.listdir(tmp_path)) == ["s.npy.partial", "s.npy.resume"]  # kept, lock released
    mm = score(train)
    np.testing.assert_array_equal(np.asarray(mm), est.pairwise_scores(test).numpy())


def test_scoring_partial_of_other_queries_or_weights_is_refused(tmp_path):
    model, train, test = worker.problem()
    est = worker.score_estimator(model, train)
    out = tmp_path / "s.npy"
    interrupted(lambda loader: est.pairwise_scores(test, loader, out=out, checkpoint_every=2), train, 5)
    other = [(test[0][0] + 1, test[0][1])]
    with pytest.raises(InfluenceError, match=r"written by another run \(different queries\).*Delete"):
        est.pairwise_scores(other, train, out=out)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    est2 = worker.score_estimator(model, train)
    with pytest.raises(InfluenceError, match=r"different model weights\)"):
        est2.pairwise_scores(test, train, out=out)
    os.remove(str(out) + ".partial")  # the documented way to start over
    mm = est2.pairwise_scores(other, train, out=out)
    np.testing.assert_array_equal(np.asarray(mm), est2.pairwise_scores(other).numpy())
    assert os.listdir(tmp_path) == ["s.npy"]


def test_scoring_resumes_inside_a_later_query_group(tmp_path):
    """With max_memory the queries are scored in groups (one pass each); a run stopped in the
    second group resumes there, and a pass reading other data than the first is refused."""
    from influence import Identity, ScoringConfig

    model, train, test = worker.problem()
    est = InfluenceEstimator(Identity(), ClassificationTask(), score_dtype=torch.float64).fit(model, train)
    full = est.pairwise_scores(test).numpy()
    est.set_params(scoring=ScoringConfig(max_memory=int(est.plan_["bytes_per_query"] * 1.5)))
    out = tmp_path / "s.npy"
    score = lambda loader: est.pairwise_scores(test, loader, out=out, checkpoint_every=2)  # noqa: E731
    with pytest.warns(UserWarning, match="split into 3 groups"):
        interrupted(score, train, 3, on_pass=2)  # counting pass, group 0, then group 1 stops at batch 3
    progress = json.loads((tmp_path / "s.npy.resume" / "progress-rank0of1.json").read_text())
    assert progress["group"] == 1 and progress["data"]["batches"] == 2
    x2, y2 = other_data()
    with pytest.warns(UserWarning), pytest.raises(InfluenceError, match="other data"):
        score(batches(x2, y2, 2))
    with pytest.warns(UserWarning):
        mm = score(train)
    np.testing.assert_array_equal(np.asarray(mm), full)
    # a loader that changes between passes (one per group) is caught at the first checkpoint
    changing = ChangingLoader(train, batches(x2, y2, 2))
    with pytest.warns(UserWarning), pytest.raises(InfluenceError, match="other data for this query group than for the first one"):
        est.pairwise_scores(test, changing, out=tmp_path / "t.npy", checkpoint_every=2)


class ChangingLoader:
    """The first two passes yield ``first`` (counting pass, group 0), later ones ``then``."""

    def __init__(self, first, then):
        self.first, self.then, self.passes = first, then, 0

    def __len__(self):
        return len(self.first)

    def __iter__(self):
        self.passes += 1
        return iter(self.first if self.passes <= 2 else self.then)
