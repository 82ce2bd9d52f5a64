"""Worker of the 2-process gloo EK-FAC test (spawned by tests/test_distributed_kfac.py): the
empirical-Fisher EK-FAC (plain and checkpointed) and true- and expected-Fisher EK-FAC and
Diagonal fits."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from _dist_worker import problem


def make_problem():
    """The 7-example problem of _dist_worker (3 + 4 examples per rank), with one layer's bias
    frozen so that its weight falls back to the Fisher diagonal."""
    model, loader, batches, test = problem()
    model[0].bias.requires_grad_(False)
    return model, loader, batches, test


def run(out_dir, tag):
    from influence import EKFAC, ClassificationTask, FallbackWarning, InfluenceEstimator

    model, loader, batches, test = make_problem()
    make = lambda: InfluenceEstimator(  # noqa: E731
        EKFAC(damping=0.1, fisher_type="empirical"), ClassificationTask(), score_dtype=torch.float64
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        est = make().fit(model, loader)
        ckpt = os.path.join(out_dir, f"ckpt-{tag}")
        est_c = make().fit(model, loader, checkpoint_dir=ckpt, checkpoint_every=1)
    cur = est.curvature_
    res = {f"stat/{k}": v for k, v in cur.statistics_.items()}
    res.update({f"ckpt/{k}": v for k, v in est_c.curvature_.statistics_.items()})
    res["num_examples"] = torch.tensor(cur.num_examples_)
    res["coverage"] = torch.tensor([m == "kronecker" for m in (e["method"] for e in cur.coverage_.values())])
    res["eigenvalues"] = torch.cat([b.eigenvalues.flatten() for b in cur.blocks_ if b.method == "kronecker"])
    res["pairwise"] = est.pairwise_scores(test)
    res["self"] = est.self_scores()
    return res


def run_true_fisher():
    """EK-FAC and Diagonal with sampled targets (fisher_type="true", 2 samples) and with the
    exact expectation over the classes ("expected"), fitted on the DataLoader (split by
    examples) and on the list of batches (split by batches: rank 1's first global index is
    counted from rank 0's batches)."""
    from influence import EKFAC, ClassificationTask, Diagonal, FallbackWarning, InfluenceEstimator

    model, loader, batches, test = make_problem()
    res = {}
    for fisher, cls in ((f, c) for f in ("true", "expected") for c in (EKFAC, Diagonal)):
        for name, data in (("loader", loader), ("batches", batches)):
            curvature = cls(damping=0.1, fisher_type=fisher, num_samples=2, seed=5)
            est = InfluenceEstimator(curvature, ClassificationTask(), score_dtype=torch.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FallbackWarning)
                est.fit(model, data)
            tag = f"{fisher}/{cls.__name__}/{name}"
            res.update({f"{tag}/{k}": v for k, v in est.curvature_.statistics_.items()})
            res[f"{tag}/pairwise"] = est.pairwise_scores(test)
    return res


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from influence import EKFAC

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        seen = []  # (pass, examples) this rank accumulates: its own shard only
        original = EKFAC._batch_statistics

        def counting(self, model, task, batch, layout, pass_index):
            seen.append([pass_index, task.num_examples(batch)])
            return original(self, model, task, batch, layout, pass_index)

        EKFAC._batch_statistics = counting
        res = run(out_dir, "dist")
        res["seen"] = torch.tensor(seen)
        EKFAC._batch_statistics = original
        res.update(run_true_fisher())
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks done before either tears gloo down: a rank destroying its process group
        # while the other still has a collective in flight aborted (SIGABRT) once in ~20 runs
        dist.barrier()
    finally:
        dist.destroy_process_group()
