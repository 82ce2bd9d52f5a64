"""Per-module, per-token and aggregated scoring against plain pairwise scoring, side by side.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_decompose.py     # writes results/
    PYTHONPATH=. python benchmarks/bench_decompose.py --smoke               # tiny, for CI

A :class:`~influence.lm.TinyLM` (every parameter attributed, float32), ``q`` queries against
``n`` training sequences of length ``T``, one call each of

- ``pairwise``: ``pairwise_scores(test, train)``, ``(q, n)``;
- ``per_module``: ``per_module=True``, ``(q, n, modules)``;
- ``per_token``: ``per_token=True``, ``(q, n, T)``;
- ``aggregate``: ``aggregate_queries="mean"``, ``(1, n)``;

for three query forms: Identity (ghost factors where the cost model picks them), EK-FAC with
exact dense queries, and EK-FAC with rank-``r`` queries (``query_rank``). The fit is excluded.
Reported: seconds (median of calls interleaved round-robin), the ratio to ``pairwise``, and the
largest difference between a split's sum and the pairwise scores.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from _common import environment, lm, lm_batch, side_by_side, result_name, smoke_cli, write
from influence import EKFAC, Identity, InfluenceEstimator, LanguageModelingTask, ScoringConfig


def cases(smoke: bool):
    if smoke:
        return dict(vocab=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8), 4, 8, 2, 2
    return dict(vocab=512, d_model=128, n_layers=2, n_heads=4, d_ff=512, max_len=64), 64, 64, 8, 16


def run(smoke: bool, out_dir: Path) -> dict:
    cfg, n, T, q, r = cases(smoke)
    torch.manual_seed(0)
    model = lm(**cfg).eval()
    task = LanguageModelingTask()
    train = [lm_batch(8 if not smoke else 2, T, cfg["vocab"], seed=s) for s in range(n // (8 if not smoke else 2))]
    test = [lm_batch(q, T, cfg["vocab"], seed=100)]
    setups = {"identity": (Identity(), None), "ekfac dense": (EKFAC(damping=1e-3), None),
              f"ekfac rank {r}": (EKFAC(damping=1e-3), ScoringConfig(query_rank=r))}
    rows, raw = [], {}
    for label, (curvature, scoring) in setups.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LayerNorm falls back to the diagonal under EK-FAC
            est = InfluenceEstimator(curvature, task, scoring=scoring).fit(model, train)
        total = est.pairwise_scores(test)
        modes = sorted({e["mode"] for e in est.plan_["layers"].values()})
        checks = {"per_module": est.pairwise_scores(test, per_module=True).sum(-1),
                  "per_token": est.pairwise_scores(test, per_token=True).sum(-1),
                  "aggregate": est.pairwise_scores(test, aggregate_queries="mean")}
        scale = float(total.abs().max())
        err = {k: float((v - (total.mean(0, keepdim=True) if k == "aggregate" else total)).abs().max()) / scale for k, v in checks.items()}
        fns = {"pairwise": lambda: est.pairwise_scores(test),
               "per_module": lambda: est.pairwise_scores(test, per_module=True),
               "per_token": lambda: est.pairwise_scores(test, per_token=True),
               "aggregate": lambda: est.pairwise_scores(test, aggregate_queries="mean")}
        t = side_by_side(fns, 1 if smoke else 5)
        raw[label] = {"seconds": t, "max_rel_diff": err, "modes": modes, "params": est.layout_.num_params}
        rows.append({"queries": label, "modes": "/".join(modes), "pairwise s": t["pairwise"],
                     "per_module s": t["per_module"], "per_module / pairwise": t["per_module"] / t["pairwise"],
                     "per_token s": t["per_token"], "per_token / pairwise": t["per_token"] / t["pairwise"],
                     "aggregate s": t["aggregate"], "aggregate / pairwise": t["aggregate"] / t["pairwise"],
                     "split sums rel diff": max(err["per_module"], err["per_token"]),
                     "aggregate vs row mean rel diff": err["aggregate"]})
        print(rows[-1], flush=True)
    payload = {"environment": environment(), "smoke": smoke, "model": cfg, "n_train": n, "T": T, "queries": q,
               "rank": r, "results": raw}
    notes = (f"TinyLM {cfg}, every parameter attributed, float32; {q} queries x {n} training sequences of length "
             f"{T} (right-padded, random lengths T/2..T). One pairwise_scores call per column, the fit excluded, "
             "median of calls interleaved round-robin. 'split sums rel diff': the largest |sum of a split - pairwise| "
             "over max |pairwise|; 'aggregate vs row mean': |aggregate - mean of the rows| over max |pairwise| (with "
             "query_rank the rows are low-rank approximations while the aggregated query is held dense and exact, "
             "so they differ by the rank truncation).")
    write(result_name("bench_decompose", smoke), payload, rows, out_dir, notes)
    return payload


if __name__ == "__main__":
    smoke_cli(run)
