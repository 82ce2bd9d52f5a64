"""Ghost (factored) versus materialised scoring on one Linear layer as the tokens per example
T grow, over several layer widths and query counts: the measured crossover against the cost
model's prediction, and the calibration of the model's ghost-efficiency factor κ.

Cost model (multiply-adds per training example, q identity queries of T tokens each):
materialise ``T·d_in·d_out + q·d_in·d_out``; ghost ``q·T·T·(d_in + d_out)``. Ghost's
multiply-adds are small dense GEMMs on data already in cache, while materialising writes and
re-reads ``B·d_in·d_out`` gradient entries, so ghost's multiply-adds are cheaper: the scorer
picks ghost while ``cost_ghost < κ · cost_materialise`` (``influence.scoring.GHOST_EFFICIENCY``).
This script measures ``κ`` as the median of ``speedup / cost ratio`` over the rows near the
crossover (cost ratio between 1/8 and 8) and reports, per configuration, the largest T at which
ghost is predicted (with the library's κ) and measured to win.

    PYTHONPATH=.:benchmarks python benchmarks/bench_crossover.py [--smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

from _common import RESULTS, environment, side_by_side, synced, write
from influence import Identity, RegressionTask, select_parameters
from influence.gradients.hooks import GradientComputer
from influence.scoring import GHOST_EFFICIENCY, Scorer, ScoringConfig


def measure(d: int, q: int, B: int, Ts, repeats: int, device: str = "cpu") -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d, bias=False)).to(device).eval()
    task = RegressionTask()
    layout = select_parameters(model)
    comp = GradientComputer(model, task, layout)
    cur = Identity().fit(model, task, [(torch.randn(1, d, device=device), torch.randn(1, d, device=device))], layout)
    rows = []
    for T in Ts:
        test = (torch.randn(q, T, d, device=device), torch.randn(q, T, d, device=device))
        train = (torch.randn(B, T, d, device=device), torch.randn(B, T, d, device=device))
        bg = comp.compute(train)
        fns, plans = {}, {}
        for mode in ("materialise", "factored"):
            sc = Scorer(comp, cur, ScoringConfig(strategy=mode))
            qs = next(sc.query_groups([test]))
            plans[mode] = sc.plan["layers"]["0"]
            fns[mode] = synced(lambda sc=sc, qs=qs: sc.score_batch(qs, bg))
        t = side_by_side(fns, repeats, warmup=2)
        plan = plans["factored"]
        ratio = plan["cost_materialise"] / plan["cost_factored"]
        err = float((fns["materialise"]() - fns["factored"]()).abs().max() / fns["materialise"]().abs().max())
        rows.append({"d": d, "q": q, "T": T, "materialise s": t["materialise"], "ghost s": t["factored"],
                     "ghost speedup": t["materialise"] / t["factored"], "cost ratio mat/ghost": ratio,
                     "predicted (uncalibrated)": "factored" if ratio > 1 else "materialise",
                     "predicted": "factored" if ratio * GHOST_EFFICIENCY > 1 else "materialise",
                     "measured": min(t, key=t.get), "max rel diff": err})
        print(rows[-1], flush=True)
    return rows


def largest_ghost_T(rows, key):
    Ts = [r["T"] for r in rows if r[key] == "factored"]
    return max(Ts) if Ts else None


def run(smoke: bool, out_dir: Path, B: int = 32, device: str = "cpu") -> dict:
    configs = [(16, 4)] if smoke else [(128, 16), (256, 16), (256, 64), (1024, 16)]
    Ts = [1, 2, 4] if smoke else [1, 2, 4, 8, 16, 32, 64]
    rows, summary = [], []
    for d, q in configs:
        part = measure(d, q, 4 if smoke else B, Ts, 1 if smoke else 5, device)
        rows += part
        summary.append({"d": d, "q": q, "largest T ghost wins: uncalibrated model": largest_ghost_T(part, "predicted (uncalibrated)"),
                        f"calibrated model (κ={GHOST_EFFICIENCY})": largest_ghost_T(part, "predicted"),
                        "measured": largest_ghost_T(part, "measured")})
    near = [r["ghost speedup"] / r["cost ratio mat/ghost"] for r in rows if 1 / 8 <= r["cost ratio mat/ghost"] <= 8]
    kappa = statistics.median(near) if near else None
    agree = sum(r["predicted"] == r["measured"] for r in rows)
    agree_raw = sum(r["predicted (uncalibrated)"] == r["measured"] for r in rows)
    payload = {"environment": environment(), "device": device, "batch": B, "rows": rows, "summary": summary, "fitted_kappa": kappa,
               "library_kappa": GHOST_EFFICIENCY, "choices_agreeing_with_measurement": {"calibrated": agree, "uncalibrated": agree_raw, "of": len(rows)}}
    notes = (f"Batches of {B}; identity queries with T tokens each; Linear d x d. Fitted κ (median speedup / cost ratio over rows with "
             f"cost ratio in [1/8, 8]) = {kappa if kappa is None else round(kappa, 2)}; the library uses κ = {GHOST_EFFICIENCY}. "
             f"Choices agreeing with the measured winner: calibrated {agree}/{len(rows)}, uncalibrated {agree_raw}/{len(rows)}.\n\n"
             "| d | q | largest T ghost wins: uncalibrated | calibrated | measured |\n|---|---|---|---|---|\n"
             + "\n".join(f"| {s['d']} | {s['q']} | {list(s.values())[2]} | {list(s.values())[3]} | {s['measured']} |" for s in summary))
    write("bench_crossover" + ("_smoke" if smoke else "") + ("" if device == "cpu" else "_" + device), payload, rows, out_dir, notes)
    return payload


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    run(a.smoke, a.out, device=a.device)
