"""Where the time goes: one benchmark case under torch.profiler and cProfile, phase by phase.

    PYTHONPATH=.:benchmarks python benchmarks/profile_case.py --device cuda [--cases grads_lm32,ekfac_lm]

Cases: ``grads_lm32`` (hook-path materialisation, LM, B = 32, as bench_grads), ``ekfac_lm`` and
``identity_lm`` (fit + pairwise scores, LM 2,000 x 50, as bench_scoring). For each phase it
prints the wall time, the top operators by self device time (self CPU time on the CPU), the
number of host-device synchronisations, and the top Python functions by own time. Output goes
to stdout and to results/profile_<case>_<device>.txt, phase by phase as each finishes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from _common import RESULTS, sync, to
from bench_grads import cases as grad_cases
from bench_scoring import make_case
from influence import InfluenceEstimator, select_parameters
from influence.curvature import EKFAC, Identity
from influence.gradients.hooks import GradientComputer


def profiled(label, fn, device, path, rows=18):
    """Runs ``fn`` once under both profilers; prints its report and appends it to the file ``path``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    py = cProfile.Profile()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        py.enable()
        result = fn()
        sync(device)
        py.disable()
        seconds = time.perf_counter() - t
    events = prof.key_averages()
    key = "self_cuda_time_total" if device != "cpu" else "self_cpu_time_total"
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"))
    s = io.StringIO()
    pstats.Stats(py, stream=s).sort_stats("tottime").print_stats(rows)
    report = [f"## {label}: {seconds:.3f} s wall (under both profilers); host-device syncs/copies: {syncs}\n",
              events.table(sort_by=key, row_limit=rows, max_name_column_width=60), "\n".join(s.getvalue().splitlines()[4:])]
    print("\n".join(report), flush=True)  # as it comes: a run stopped at its time limit keeps it
    with open(path, "a") as f:
        f.write("\n".join(report) + "\n")
    return result


def grads_lm32(device, path, smoke=False, lm_train=None):
    name, model, task, batch, _ = [c for c in grad_cases(smoke, device) if c[0] == ("lm" if smoke else "lm B=32")][0]
    model = model.to(device).eval()
    batch = to(batch, device)
    layout = select_parameters(model)
    comp = GradientComputer(model, task, layout, "hooks")
    buf = torch.empty(task.num_examples(batch), layout.num_params, device=device)
    for _ in range(2):  # warm-up
        comp.flat(batch, out=buf)
    profiled("capture pass (factors only)", lambda: comp.compute(batch), device, path)
    factors = comp.compute(batch)
    profiled("materialise into (B, P)", lambda: factors.flat(buf), device, path)


def scoring(curvature):
    def run(device, path, smoke=False, lm_train=2_000):
        model, task, params, train, test = make_case("lm", smoke, lm_train)
        model = model.to(device).eval()
        train, test = to(train, device), to(test, device)
        InfluenceEstimator(Identity(), task, params).fit(model, train[:2]).pairwise_scores(test)  # warm-up
        est = InfluenceEstimator(curvature(), task, params)
        profiled("fit", lambda: est.fit(model, train), device, path)
        profiled("pairwise_scores", lambda: est.pairwise_scores(test), device, path)

    return run


CASES = {"grads_lm32": grads_lm32, "ekfac_lm": scoring(lambda: EKFAC(damping=1e-3)), "identity_lm": scoring(Identity)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="grads_lm32,ekfac_lm")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the speed")
    ap.add_argument("--lm-train", type=int, default=2_000, help="training examples of the scoring cases")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for case in a.cases.split(","):
        path = RESULTS / f"profile_{case}_{a.device}{'_smoke' if a.smoke else ''}.txt"
        head = f"# profile {case} on {a.device} (torch {torch.__version__}, LM train {a.lm_train})\n"
        path.write_text(head)
        print(head, flush=True)
        CASES[case](a.device, path, a.smoke, a.lm_train)
