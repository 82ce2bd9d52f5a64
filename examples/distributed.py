"""Data-parallel influence with torch.distributed: fit and score on several processes.

Run on CPU with two processes (gloo)::

    torchrun --standalone --nproc_per_node=2 examples/distributed.py

or on a machine with GPUs (NCCL, one process per GPU)::

    torchrun --standalone --nproc_per_node=8 examples/distributed.py --backend nccl

Every rank builds the same model and the same loaders; the estimator splits the training set
into contiguous shards (uneven splits are fine), all-reduces the curvature statistics, and
gathers the scores so every rank holds the full matrix. Only rank 0 prints and saves.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from influence import ClassificationTask, Exact, InfluenceEstimator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--out", default="influence-distributed")
    args = parser.parse_args()

    dist.init_process_group(args.backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if args.backend == "nccl" else torch.device("cpu")

    torch.manual_seed(0)  # the same weights and data on every rank
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double().to(device).eval()
    x, y = torch.randn(101, 5, dtype=torch.float64, device=device), torch.randint(0, 3, (101,), device=device)
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    test = [(x[:4], y[:4])]

    est = InfluenceEstimator(Exact(damping=1e-2, curvature_type="ggn"), ClassificationTask(), progress=rank == 0)
    est.fit(model, train, checkpoint_dir=os.path.join(args.out, "fit-checkpoints"))
    scores = est.pairwise_scores(test)                                    # (4, 101) on every rank
    mm = est.pairwise_scores(test, out=os.path.join(args.out, "scores.npy"))  # each rank writes its columns
    values, indices = est.top_k(test, k=5)
    if rank == 0:
        print("scores", tuple(scores.shape), "memmap", mm.shape, "top-5 of query 0:", indices[0].tolist())
        print("timings (s):", {k: round(v, 3) for k, v in est.timings_.items()})
        est.save(os.path.join(args.out, "estimator.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
