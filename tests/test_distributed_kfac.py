"""Two gloo processes fit the same EK-FAC (factors, corrections, scores) as one process, with
the empirical Fisher, with sampled targets (true Fisher: the draws are keyed by the global
example index, so the ranks draw what one process draws) and with the exact expectation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

import _dist_kfac_worker
import _dist_worker


@pytest.mark.slow
def test_two_gloo_processes_fit_the_same_ekfac_as_one_process(tmp_path):
    init = tmp_path / "init"
    mp.spawn(_dist_kfac_worker.worker, args=(2, str(init), str(tmp_path)), nprocs=2, join=True)
    single = _dist_kfac_worker.run(str(tmp_path), "single")
    single.update(_dist_kfac_worker.run_true_fisher())
    assert int(single["num_examples"]) == _dist_worker.N_TRAIN
    assert single["coverage"].tolist() == [False, True]  # "0.weight" -> diagonal, "2" -> kronecker
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        # uneven split of the DataLoader (batch size 2): rank 0 gets 3 examples, rank 1 gets 4;
        # per pass, once plain and once checkpointed
        shard = [2, 1] if rank == 0 else [2, 2]
        expected = [[p, n] for _ in range(2) for p in (0, 1) for n in shard]
        assert res.pop("seen").tolist() == expected
        assert sorted(res) == sorted(single)
        for key, value in single.items():
            got = res[key]
            assert got.shape == value.shape, key
            if got.is_floating_point():
                torch.testing.assert_close(got, value, rtol=0, atol=1e-10, msg=key)
            else:
                assert torch.equal(got, value), key
    assert not [f for f in os.listdir(tmp_path) if f.startswith("ckpt") and os.listdir(tmp_path / f)]
