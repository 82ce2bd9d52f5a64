"""Worker of tests/test_distributed_checks.py: ranks given different inputs, a rank that hangs.

Each case records ``(exception class name, message, seconds)`` or ``"ok"`` per rank.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from _dist_worker import problem
from zoo import classification_data


class SlowBatches:
    """A sized iterable of batches (split by batches); on rank 1 batch 1 takes ``delay`` s."""

    def __init__(self, items, rank, delay):
        self.items, self.rank, self.delay = items, rank, delay

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        for i, b in enumerate(self.items):
            if i == 1 and self.rank == 1:
                time.sleep(self.delay)  # a loader that hangs (longer than the timeout)
            yield b


def attempt(call):
    start = time.perf_counter()
    try:
        call()
        return "ok"
    except Exception as error:  # noqa: BLE001 - recorded for the test to check
        return [type(error).__name__, str(error), time.perf_counter() - start]


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from influence import ClassificationTask, Diagonal, Exact, Identity, InfluenceEstimator

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, loader, batches, test = problem()
    est = lambda curvature, **kw: InfluenceEstimator(curvature, ClassificationTask(), score_dtype=torch.float64, **kw)  # noqa: E731
    res = {}
    # 1. rank 1 trains on other data of the same size
    x, y = classification_data(n=len(loader.dataset), d_in=3, classes=2, seed=2 + rank)
    res["fit_other_data"] = attempt(lambda: est(Exact(damping=0.1)).fit(model, DataLoader(TensorDataset(x, y), batch_size=2)))
    # 2. rank 1 has one training example more
    x, y = classification_data(n=len(loader.dataset) + rank, d_in=3, classes=2, seed=2)
    res["fit_other_size"] = attempt(lambda: est(Exact(damping=0.1)).fit(model, DataLoader(TensorDataset(x, y), batch_size=2)))
    # 3. rank 1 scores other queries, in memory and to a file
    fitted = est(Identity()).fit(model, loader)
    xt, yt = classification_data(n=3, d_in=3, classes=2, seed=3 + rank)
    res["pairwise_other_queries"] = attempt(lambda: fitted.pairwise_scores([(xt, yt)]))
    res["memmap_other_queries"] = attempt(lambda: fitted.pairwise_scores([(xt, yt)], out=os.path.join(out_dir, "s.npy")))
    res["files_after"] = sorted(os.listdir(out_dir))
    # 4. the same inputs on both ranks: no false alarm (lists of batches and DataLoaders)
    res["same_inputs"] = attempt(lambda: fitted.pairwise_scores(test, batches))
    res["same_inputs_fit"] = attempt(lambda: est(Diagonal(damping=0.1)).fit(model, batches).pairwise_scores(test))
    # 5. rank 1's loader hangs in the fit's pass: rank 0 gives up after the timeout
    slow = SlowBatches(batches, rank, delay=6.0)
    res["hang"] = attempt(lambda: est(Diagonal(damping=0.1), distributed_timeout=2).fit(model, slow))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    os._exit(0)  # the group is broken after a timeout: no teardown
