"""Ghost (factored) versus materialised scoring on one Linear layer as the tokens per example
T grow: the measured crossover against the cost model's prediction.

Cost model (multiply-adds per training example, q queries of T tokens each, identity):
materialise ``T·d_in·d_out + q·d_in·d_out``; ghost ``q·T·T·(d_in + d_out)``.

    PYTHONPATH=.:benchmarks python benchmarks/bench_crossover.py [--smoke]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from _common import RESULTS, environment, side_by_side, write
from influence import Identity, RegressionTask, select_parameters
from influence.gradients.hooks import GradientComputer
from influence.scoring import Scorer, ScoringConfig


def run(smoke: bool, out_dir: Path, d: int = 256, q: int = 16, B: int = 32) -> dict:
    if smoke:
        d, q, B = 16, 4, 4
    Ts = [1, 2, 4] if smoke else [1, 2, 4, 8, 16, 32, 64]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d, bias=False)).eval()
    task = RegressionTask()
    layout = select_parameters(model)
    comp = GradientComputer(model, task, layout)
    cur = Identity().fit(model, task, [(torch.randn(1, d), torch.randn(1, d))], layout)
    rows, raw = [], []
    for T in Ts:
        test = (torch.randn(q, T, d), torch.randn(q, T, d))
        train = (torch.randn(B, T, d), torch.randn(B, T, d))
        bg = comp.compute(train)
        fns, scorers = {}, {}
        for mode in ("materialise", "factored"):
            sc = Scorer(comp, cur, ScoringConfig(strategy=mode))
            qs = next(sc.query_groups([test]))
            scorers[mode] = (sc, qs)
            fns[mode] = (lambda sc=sc, qs=qs: sc.score_batch(qs, bg))
        t = side_by_side(fns, 1 if smoke else 5, warmup=2)
        plan = scorers["factored"][0].plan["layers"]["0"]
        predicted = "factored" if plan["cost_factored"] < plan["cost_materialise"] else "materialise"
        measured = min(t, key=t.get)
        err = float((fns["materialise"]() - fns["factored"]()).abs().max())
        row = {"T": T, "materialise s": t["materialise"], "ghost s": t["factored"], "ghost speedup": t["materialise"] / t["factored"],
               "cost ratio mat/ghost": plan["cost_materialise"] / plan["cost_factored"], "predicted": predicted, "measured": measured, "max abs diff": err}
        rows.append(row)
        raw.append(row)
        print(row, flush=True)
    pred_T = [r["T"] for r in rows if r["predicted"] == "factored"]
    meas_T = [r["T"] for r in rows if r["measured"] == "factored"]
    payload = {"environment": environment(), "d": d, "queries": q, "batch": B, "rows": raw,
               "largest_T_ghost_predicted": max(pred_T) if pred_T else None, "largest_T_ghost_measured": max(meas_T) if meas_T else None}
    write("bench_crossover" + ("_smoke" if smoke else ""), payload, rows, out_dir,
          f"Linear {d}x{d}, {q} identity queries with T tokens each, batches of {B}. Predicted crossover: largest T where ghost wins "
          f"= {payload['largest_T_ghost_predicted']}; measured = {payload['largest_T_ghost_measured']}.")
    return payload


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    run(a.smoke, a.out)
