"""Peak memory of ``pairwise_scores(out=...)``: 50,000 training examples x 2,000 and 8,000 queries.

Each case runs in a fresh subprocess: build an MLP (32 -> 64 -> 64 -> 10, 6,922 parameters) and
random data, fit K-FAC (damping 1e-3, so queries are held exact and dense: ``n_test x P``
floats), then score into a memory-mapped ``.npy`` file in a temporary directory. Reported:

- ``peak_rss_mb``: the process's peak resident set (``VmHWM``). It includes the pages of the
  memory-mapped score file the process has touched (file-backed, written back and reclaimable
  by the kernel, but counted while mapped);
- ``peak_anon_mb``: the peak anonymous memory (``RssAnon``, sampled every 10 ms by a thread):
  the tensors, without the score file's pages;
- ``fit_anon_mb``: anonymous memory after the fit, before scoring; ``scoring_anon_mb`` the
  peak minus that: what scoring added;
- ``queries_mb``: one copy of the dense preconditioned queries (``n_test x P x 4`` bytes), and
  ``plan_``'s query groups and resident query bytes (``max_memory`` cases split the queries).

    PYTHONPATH=.:benchmarks python benchmarks/bench_memory.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [(2_000, None), (8_000, None), (8_000, 64 << 20)]
SMOKE = [(50, None), (50, 64 << 10)]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class AnonPeak:
    """Samples ``RssAnon`` every 10 ms in a thread; ``peak`` is the largest value seen."""

    def __init__(self):
        self.peak, self._stop = _status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status("RssAnon"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def child(n_train: int, n_test: int, max_memory: int | None) -> dict:
    import torch

    from _common import mlp
    from influence import KFAC, ClassificationTask, InfluenceEstimator, ScoringConfig

    torch.manual_seed(0)
    model = mlp(32, 64, 2, 10)
    P = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train + n_test, 32, generator=g), torch.randint(0, 10, (n_train + n_test,), generator=g)
    bs = 500
    train = [(x[i : i + bs], y[i : i + bs]) for i in range(0, n_train, bs)]
    test = [(x[n_train + i : n_train + i + bs], y[n_train + i : n_train + i + bs]) for i in range(0, n_test, bs)]
    est = InfluenceEstimator(KFAC(damping=1e-3), ClassificationTask(), scoring=ScoringConfig(max_memory=max_memory)).fit(model, train)
    fit_anon = _status("RssAnon")
    with tempfile.TemporaryDirectory() as tmp, AnonPeak() as anon:
        t = time.perf_counter()
        mm = est.pairwise_scores(test, out=os.path.join(tmp, "scores.npy"))
        seconds = time.perf_counter() - t
        checksum = float(abs(mm[:, :: max(n_train // 1000, 1)]).sum())
        del mm
    plan = getattr(est, "plan_", None) or {}
    mb = 1 << 20
    return {"n_train": n_train, "n_test": n_test, "params": P, "max_memory_mb": None if max_memory is None else max_memory / mb,
            "seconds": seconds, "peak_rss_mb": _status("VmHWM") / mb, "peak_anon_mb": anon.peak / mb,
            "fit_anon_mb": fit_anon / mb, "scoring_anon_mb": (anon.peak - fit_anon) / mb, "queries_mb": n_test * P * 4 / mb,
            "query_groups": plan.get("query_groups"), "resident_query_mb": None if "resident_query_bytes" not in plan else plan["resident_query_bytes"] / mb,
            "checksum": checksum}


def run(smoke: bool = False, out_dir: Path | None = None, name: str | None = None) -> dict:
    from _common import RESULTS, environment, write

    n_train = 2_000 if smoke else 50_000
    rows = []
    for n_test, max_memory in SMOKE if smoke else CASES:
        cmd = [sys.executable, __file__, "--child", str(n_train), str(n_test), str(max_memory or 0)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    name = name or ("bench_memory_smoke" if smoke else "bench_memory")
    payload = {"environment": environment(), "smoke": smoke, "results": rows}
    notes = ("peak_rss includes the touched pages of the memory-mapped score file (file-backed, "
             "reclaimable); peak_anon is the tensors' memory. queries_mb is one dense copy of the "
             "preconditioned queries (n_test x P float32).")
    write(name, payload, rows, out_dir or RESULTS, notes)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--name", default=None, help="results file name (default bench_memory)")
    parser.add_argument("--child", nargs=3, type=int, metavar=("N_TRAIN", "N_TEST", "MAX_MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n_train, n_test, max_memory = args.child
        print(json.dumps(child(n_train, n_test, max_memory or None)))
    else:
        run(args.smoke, name=args.name)
