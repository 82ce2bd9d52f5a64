"""Worker of the 2-process gloo test of the matrix-free curvatures
(spawned by tests/test_distributed_iterative.py)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from _dist_worker import problem

READ: list[int] = []  # training examples this process read (DataLoader indices)


class CountingDataset(TensorDataset):
    """Records every example index read, to check that each rank reads only its shard."""

    def __getitem__(self, index):
        READ.append(int(index))
        return super().__getitem__(index)


def make_problem():
    """The 7-example problem of _dist_worker (3 + 4 examples per rank) on a counting dataset."""
    model, loader, _, test = problem()
    # batch_size 3: rank 0 has 1 batch, rank 1 has 2 (CG self-scores: unequal solve counts)
    loader = DataLoader(CountingDataset(*loader.dataset.tensors), batch_size=3)
    return model, loader, test


def curvatures():
    from influence import CG, Arnoldi, DataInf, LiSSA

    return {
        "cg": lambda: CG(damping=0.1, curvature_type="ggn", rtol=1e-13, max_iter=200),
        # empirical Fisher: the gradient cache and the diagonal preconditioner's mean squares
        "cg_fisher": lambda: CG(damping=0.1, curvature_type="fisher", rtol=1e-13, preconditioner="diagonal"),
        "arnoldi": lambda: Arnoldi(damping=0.1, rank=6, curvature_type="ggn"),
        "datainf": lambda: DataInf(damping=0.1),
        "lissa": lambda: LiSSA(damping=0.1, curvature_type="ggn", depth=30, power_iters=10),
    }


def run():
    """Fits each curvature and scores; returns the results and the example indices read."""
    from influence import ClassificationTask, InfluenceEstimator

    model, loader, test = make_problem()
    G = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    res, reads = {}, {}
    for name, make in curvatures().items():
        READ.clear()
        make().fit(model, ClassificationTask(), loader)  # the curvature's own reads
        fit_reads = set(READ)
        # (InfluenceEstimator.fit also counts the examples of the whole loader: not checked)
        est = InfluenceEstimator(make(), ClassificationTask(), score_dtype=torch.float64).fit(model, loader)
        READ.clear()
        cur = est.curvature_
        res[f"{name}/num_examples"] = torch.tensor(cur.operator_.num_examples)
        res[f"{name}/sharded"] = torch.tensor(cur.operator_.sharded)
        res[f"{name}/solve"] = cur.solve(G)
        res[f"{name}/residual"] = cur.residual(G)
        res[f"{name}/pairwise"] = est.pairwise_scores(test)
        if name == "arnoldi":
            res[f"{name}/eigenvalues"] = cur.eigenvalues_
        if name == "datainf":
            res[f"{name}/train_grads"] = cur.train_grads_
        if name == "lissa":
            res[f"{name}/top_eigenvalue"] = torch.tensor(cur.top_eigenvalue_)
        # fit, solves, residuals and scoring; LiSSA's solve draws from all batches by design
        # (its recursion is replicated on every rank), so only its fit is checked
        reads[name] = sorted(fit_reads if name == "lissa" else fit_reads | set(READ))
        if name in ("cg", "cg_fisher"):  # rows differing across ranks, unequal batch counts
            res[f"{name}/self"] = est.self_scores()
            rows = dist.get_rank() + 1 if dist.is_initialized() else len(G)  # 1 and 2 rows
            res[f"{name}/residual_rankwise"] = cur.residual(G[:rows])
    return res, reads


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        res, reads = run()
        torch.save({"res": res, "reads": reads}, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks done before either tears gloo down: a rank destroying its process group
        # while the other still has a collective in flight aborted (SIGABRT) once in ~20 runs
        dist.barrier()
    finally:
        dist.destroy_process_group()
