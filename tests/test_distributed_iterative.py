"""Two gloo processes give the same CG / Arnoldi / DataInf / LiSSA fits and scores as one
process, each rank reading only its shard of the training data for the curvature products."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import _dist_iterative_worker as worker


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_for_matrix_free_curvatures(tmp_path):
    init = tmp_path / "init"
    mp.spawn(worker.worker, args=(2, str(init), str(tmp_path)), nprocs=2, join=True)
    single, _ = worker.run()
    shards = [set(range(0, 3)), set(range(3, 7))]  # 7 examples split 3 + 4
    # the estimator's check that the ranks hold the same data reads the examples at the shard
    # starts and the last one (fingerprints, no gradients)
    fingerprinted = {0, 3, 6}
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        res, reads = saved["res"], saved["reads"]
        for name, read in reads.items():
            # DataLoader over a Subset: the rank's shard only (fit, products, scoring)
            expected = shards[rank] if name == "lissa" else shards[rank] | fingerprinted
            assert set(read) == expected, (name, rank, read)
        for key, expected in single.items():
            got = res[key]
            if key.endswith("/sharded"):
                assert bool(got) and not bool(expected), key
                continue
            if key == "cg/residual_rankwise" or key == "cg_fisher/residual_rankwise":
                expected = expected[: rank + 1]
            assert got.shape == expected.shape, key
            if got.is_floating_point():
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-10, msg=key)
            else:
                assert torch.equal(got, expected), key
    assert int(single["cg/num_examples"]) == 7
