"""Two gloo processes give the same fitted curvature and scores as one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from influence import ClassificationTask, Exact, InfluenceError, InfluenceEstimator
from influence.distributed import shard, shard_bounds

import _dist_worker


def test_shard_bounds_cover_uneven_splits():
    for n in (5, 7, 10):
        for world in (1, 2, 3):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        shard_bounds(4, 2, 2)


def test_shard_splits_lists_by_batches_and_loaders_by_examples():
    model, loader, batches, _ = _dist_worker.problem()
    assert shard(batches, 0, 2) == batches[:1] and shard(batches, 1, 2) == batches[1:]
    parts = [list(shard(loader, r, 2)) for r in range(2)]
    assert [sum(len(b[1]) for b in p) for p in parts] == [3, 4]
    assert torch.equal(torch.cat([b[0] for p in parts for b in p]), loader.dataset.tensors[0])
    assert shard(loader, 0, 1) is loader
    with pytest.raises(InfluenceError, match="Rank 0 of 2 gets no batches"):
        shard(batches[:1], 0, 2)
    with pytest.raises(InfluenceError, match="has no len"):
        shard(iter(batches), 0, 2)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    init = tmp_path / "init"
    mp.spawn(_dist_worker.worker, args=(2, str(init), str(tmp_path)), nprocs=2, join=True)
    model, loader, batches, test = _dist_worker.problem()
    factory = lambda: InfluenceEstimator(  # noqa: E731
        Exact(damping=0.1, curvature_type="ggn"), ClassificationTask(), score_dtype=torch.float64
    )
    single = _dist_worker.run(factory, model, loader, batches, test, str(tmp_path), "single")
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        # fit on the DataLoader (3 + 4 examples), on the list of batches (1 + 2 batches), then
        # on the DataLoader again with per-rank checkpoints
        assert res.pop("seen").tolist() == ([2, 1, 3, 2, 1] if rank == 0 else [2, 2, 2, 2, 2, 2])
        for key, expected in single.items():
            got = res[key]
            assert got.shape == expected.shape, key
            if got.is_floating_point():
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-10, msg=key)
            else:
                assert torch.equal(got, expected), key
    assert int(single["num_examples"]) == _dist_worker.N_TRAIN
    assert not [f for f in os.listdir(tmp_path) if "progress" in f or f.endswith(".partial")]


def test_distributed_timeout_is_validated():
    model, loader, _, _ = _dist_worker.problem()
    for bad in (0, -1.0, "5m", True):
        est = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), ClassificationTask(), distributed_timeout=bad)
        with pytest.raises(ValueError, match=r"distributed_timeout must be a positive number of seconds or None"):
            est.fit(model, loader)
    for good in (None, 2, 0.5):  # None: the process group's own timeout
        InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), ClassificationTask(), distributed_timeout=good).fit(model, loader)
