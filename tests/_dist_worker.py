"""Worker of the 2-process gloo test (spawned by tests/test_distributed.py)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from zoo import classification_data, lm_batch, mlp, tiny_lm

N_TRAIN = 7  # uneven: 3 + 4 examples, or 1 + 2 batches


def problem():
    model = mlp(d_in=3, hidden=(3,), d_out=2, seed=1)
    x, y = classification_data(n=N_TRAIN, d_in=3, classes=2, seed=2)
    xt, yt = classification_data(n=3, d_in=3, classes=2, seed=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    batches = [(x[:3], y[:3]), (x[3:5], y[3:5]), (x[5:], y[5:])]
    return model, loader, batches, [(xt, yt)]


def run(est_factory, model, loader, batches, test, out_dir, tag):
    """Fits on the DataLoader and scores both loaders; returns the results."""
    est = est_factory().fit(model, loader)
    res = {
        "matrix": est.curvature_.matrix_,
        "num_examples": torch.tensor(est.curvature_.num_examples_),
        "pairwise": est.pairwise_scores(test),
        "pairwise_batches": est.pairwise_scores(test, batches),
        "self": est.self_scores(),
        "top_v": est.top_k(test, 3)[0],
        "top_i": est.top_k(test, 3)[1],
        "bottom_i": est.top_k(test, 2, largest=False, train_loader=batches)[1],
    }
    est_b = est_factory().fit(model, batches)  # fitted on a list of batches, split by batches
    res["matrix_batches"] = est_b.curvature_.matrix_
    ckpt = os.path.join(out_dir, f"ckpt-{tag}")  # per-rank checkpoints, removed at the end
    est_c = est_factory().fit(model, loader, checkpoint_dir=ckpt, checkpoint_every=1)
    from influence.distributed import rank_and_world

    rank, world = rank_and_world()
    assert not [f for f in os.listdir(ckpt) if f"rank{rank}of{world}" in f]  # this rank's file removed
    res["matrix_checkpointed"] = est_c.curvature_.matrix_
    mm = est.pairwise_scores(test, out=os.path.join(out_dir, f"{tag}.npy"))
    res["memmap"] = torch.from_numpy(mm.copy())
    res["per_module"] = est.pairwise_scores(test, per_module=True)
    res["aggregate"] = est.pairwise_scores(test, aggregate_queries="sum")
    # per token: the shards' longest sequences differ (rank 0: 5 tokens, rank 1: 8 and 6)
    from influence import Identity, InfluenceEstimator, LanguageModelingTask

    lm_train = [lm_batch(n=2, T=5, seed=1), lm_batch(n=3, T=8, seed=2), lm_batch(n=2, T=6, seed=3)]
    lm = InfluenceEstimator(Identity(), LanguageModelingTask(), score_dtype=torch.float64).fit(tiny_lm(), lm_train)
    res["per_token"] = lm.pairwise_scores([lm_batch(n=2, seed=4)], per_token=True)
    return res


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from influence import ClassificationTask, Exact, InfluenceEstimator

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from influence.distributed import is_active

        assert is_active()
        seen = []  # examples this rank accumulates: its own shard only
        original = Exact._batch_statistics

        def counting(self, model, task, batch, layout, pass_index):
            seen.append(task.num_examples(batch))
            return original(self, model, task, batch, layout, pass_index)

        Exact._batch_statistics = counting
        model, loader, batches, test = problem()
        factory = lambda: InfluenceEstimator(  # noqa: E731
            Exact(damping=0.1, curvature_type="ggn"), ClassificationTask(), score_dtype=torch.float64
        )
        res = run(factory, model, loader, batches, test, out_dir, "dist")
        res["seen"] = torch.tensor(seen)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks done before either tears gloo down: a rank destroying its process group
        # while the other still has a collective in flight aborted (SIGABRT) once in ~20 runs
        dist.barrier()
    finally:
        dist.destroy_process_group()
