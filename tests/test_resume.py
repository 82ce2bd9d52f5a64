"""A run killed midway (SIGKILL in a subprocess) resumes where it stopped, identically."""

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
import influence._outputs
from influence import Exact, InfluenceError
from influence.io import load_tensors

HERE = os.path.dirname(__file__)


def run_killed(mode, directory, k):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_resume_worker.py"), mode, str(directory), str(k)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.slow
def test_killed_fit_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    run_killed("fit", tmp_path, 5)  # batches 0-4 done, checkpoint after batch 4 (every 2)
    (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
    _, meta = load_tensors(path, "fit-checkpoint")
    assert meta["batches"] == 4 and not meta["complete"]

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

    _save_checkpoint(_checkpoint_path(str(tmp_path), Exact(), 0), "another-key", {}, 2, False)
    with pytest.raises(InfluenceError, match="belongs to another run.*Delete it"):
        est.fit(model, train, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        est.fit(model, train, checkpoint_dir=tmp_path, checkpoint_every=0)


@pytest.mark.slow
def test_killed_scoring_resumes_its_columns(tmp_path, monkeypatch):
    run_killed("score", tmp_path, 3)  # batches 0-2 written, progress saved after batch 2
    progress = [f for f in os.listdir(tmp_path) if "progress" in f]
    assert sorted(os.listdir(tmp_path)) == sorted(["scores.npy.partial", "scores.npy.factors.safetensors"] + progress)
    assert json.loads((tmp_path / progress[0]).read_text())["batches"] == 2

    model, train, test = worker.problem()
    est = worker.score_estimator(model, train)
    calls = []
    original = influence._outputs._train_grads
    monkeypatch.setattr(influence._outputs, "_train_grads", lambda *a: calls.append(1) or original(*a))
    mm = est.pairwise_scores(test, train, out=tmp_path / "scores.npy", checkpoint_every=2)
    assert len(calls) == 4  # batches 2..5 (batch 2 was done but not yet checkpointed)
    assert os.listdir(tmp_path) == ["scores.npy"]
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    uninterrupted = est.pairwise_scores(test, train, out=tmp_path / "again.npy")
    np.testing.assert_array_equal(np.asarray(mm), np.asarray(uninterrupted))  # resumed == uninterrupted
    # the in-memory scorer accumulates in another order: equal to rounding
    np.testing.assert_allclose(np.asarray(mm), est.pairwise_scores(test).numpy(), rtol=1e-12, atol=1e-14)


def test_scoring_with_other_queries_starts_afresh(tmp_path):
    model, train, test = worker.problem()
    est = worker.score_estimator(model, train)
    out = tmp_path / "s.npy"
    est.pairwise_scores(test, train, out=out)
    first = np.load(out)
    # leave a stale partial run behind, made with other queries
    os.replace(out, str(out) + ".partial")
    stale = np.lib.format.open_memmap(str(out) + ".partial", mode="r+")
    stale[:] = 7.0
    stale.flush()
    del stale
    other = [(test[0][0] + 1, test[0][1])]
    from influence.io import save_tensors

    save_tensors(str(out) + ".factors.safetensors", {"factors": est.influence_factors(other)}, {"kind": "query-factors"})
    key = influence._outputs._key(est, est.influence_factors(test), 12)
    (tmp_path / "s.npy.progress-rank0of1.json").write_text(json.dumps({"key": key, "batches": 6}))
    mm = est.pairwise_scores(test, train, out=out)
    np.testing.assert_array_equal(np.asarray(mm), first)  # recomputed, not the stale columns
    assert os.listdir(tmp_path) == ["s.npy"]
