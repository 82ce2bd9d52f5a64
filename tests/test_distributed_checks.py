"""Under torch.distributed, ranks given different inputs are refused, and a rank that does not
arrive stops the others after ``distributed_timeout`` seconds (2 gloo processes)."""

from __future__ import annotations

import json
import re

import pytest
import torch.multiprocessing as mp

import _dist_checks_worker


@pytest.mark.slow
def test_ranks_with_other_inputs_are_refused_and_a_hanging_rank_times_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_dist_checks_worker.worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for res in ranks:  # issue 13.16: every rank refuses, naming what differs and the rank
        kind, msg, _ = res["fit_other_data"]
        assert kind == "InfluenceError" and msg.startswith("fit: the training data of rank(s) [1] differ from rank 0's (example digests)")
        assert "build them identically on every rank" in msg
        kind, msg, _ = res["fit_other_size"]
        assert kind == "InfluenceError" and "(example digests, examples)" in msg
        for case in ("pairwise_other_queries", "memmap_other_queries"):
            kind, msg, _ = res[case]
            assert kind == "InfluenceError" and msg.startswith("pairwise_scores: the queries of rank(s) [1] differ from rank 0's (digest)"), case
        assert res["files_after"] == []  # refused before the file was created
        assert res["same_inputs"] == res["same_inputs_fit"] == "ok"
    # issue 13.15: rank 1's loader hangs for 6 s; rank 0 stops after the 2 s timeout naming the
    # stage, the collective and the missing rank
    kind, msg, seconds = ranks[0]["hang"]
    assert kind == "DistributedTimeoutError", msg
    assert re.match(r"fit: rank\(s\) 1 did not arrive at the [\w -]+ within distributed_timeout=2 s", msg), msg
    assert seconds < 5.0
    kind, msg, _ = ranks[1]["hang"]  # rank 1 arrives after rank 0 gave up
    assert kind == "DistributedTimeoutError" and msg.startswith("fit: rank 1 arrived but rank 0 did not confirm")
