"""``influence demo`` on a busy machine: wall time with 1 or more intra-op threads, idle and
with competing busy processes.

Issue 17.6: the default demo took 2 min on an idle 2-core machine but 55 min while other
processes kept both cores busy. Each measured run is a fresh process (so torch's thread pool
and the OpenMP runtime start as a user's would), with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
removed from its environment and the thread count set by ``--threads``:

- ``pretrain``: the demo's base-model pretraining alone (``PretrainConfig(steps=...)``, fresh
  cache), timed inside the process (import excluded);
- ``demo``: ``python -m influence demo --quick --no-progress`` with a fresh cache (so it
  pretrains too), timed as the whole process's wall time (what a user waits).

A thread setting is ``N`` (``--threads N``) or ``N:passive`` (the same with
``OMP_WAIT_POLICY=PASSIVE`` in the environment: idle OpenMP threads sleep instead of
spinning). "busy" starts ``--busy`` processes running ``while True: pass`` (default: one per
core) before the runs of that load and stops them after. Settings and loads are interleaved
within each round, and the 1-minute load average is recorded before and after every run:
on a shared machine "idle" only means "no busy processes of ours".

Usage::

    python benchmarks/bench_busy_demo.py                       # pretrain + demo --quick, 1 round
    python benchmarks/bench_busy_demo.py --what pretrain --rounds 3 --settings 1 2 2:passive
    python benchmarks/bench_busy_demo.py --what demo --append  # add demo runs to the results
    python benchmarks/bench_busy_demo.py --quick               # smoke: 20 pretraining steps

Writes ``results/bench_busy_demo.{json,md}`` (``_smoke`` suffix with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BUSY_LOOP = "while True: pass"


def parse_setting(text: str) -> tuple[int, bool]:
    """``"2"`` -> ``(2, False)``; ``"2:passive"`` -> ``(2, True)``."""
    threads, _, policy = text.partition(":")
    if not threads.isdigit() or int(threads) < 1 or policy not in ("", "passive"):
        raise SystemExit(f"Invalid thread setting {text!r}: expected N or N:passive with N >= 1.")
    return int(threads), policy == "passive"


def child_env(passive: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def worker_pretrain(threads: int, steps: int, cache: str) -> None:
    """Runs in the child: pretraining alone, timed; prints one JSON line."""
    import torch

    from influence.demo.pretrain import PretrainConfig, pretrain

    torch.set_num_threads(threads)
    start = time.perf_counter()
    _, _, info = pretrain(PretrainConfig(steps=steps), cache, progress=False)
    assert not info["cached"]
    print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}))


def measure(what: str, threads: int, passive: bool, steps: int, timeout: float) -> dict:
    """One run in a fresh process: ``{"seconds", "load_before", "load_after", "status"}``."""
    with tempfile.TemporaryDirectory() as tmp:
        if what == "pretrain":
            cmd = [sys.executable, __file__, "--worker", "--threads", str(threads),
                   "--pretrain-steps", str(steps), "--cache", tmp]
        else:
            cmd = [sys.executable, "-m", "influence", "demo", "--quick", "--no-progress",
                   "--threads", str(threads), "--cache", tmp, "--out", os.path.join(tmp, "out")]
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, env=child_env(passive), cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"seconds": None, "status": f"timeout > {timeout:g} s",
                    "load_before": load_before, "load_after": os.getloadavg()[0]}
        wall = time.perf_counter() - start
        row = {"load_before": load_before, "load_after": os.getloadavg()[0]}
        if done.returncode != 0:
            return {**row, "seconds": None, "status": f"failed: {done.stderr.strip()[-500:]}"}
        if what == "pretrain":
            return {**row, "seconds": json.loads(done.stdout.strip().splitlines()[-1])["seconds"], "status": "ok"}
        return {**row, "seconds": wall, "status": "ok"}


class BusyProcesses:
    """``n`` processes spinning in a Python loop while the block runs (stopped by their ids)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(self.n)]
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []


def run(args: argparse.Namespace) -> list[dict]:
    settings = [parse_setting(s) for s in args.settings]
    rows = []
    for rnd in range(args.rounds):
        loads = args.loads if rnd % 2 == 0 else list(reversed(args.loads))
        for load in loads:
            busy = BusyProcesses(args.busy if load == "busy" else 0)
            with busy:
                for what in args.what:
                    order = settings if rnd % 2 == 0 else list(reversed(settings))
                    for threads, passive in order:
                        row = {"round": rnd, "what": what, "load": load, "threads": threads,
                               "omp_wait_policy": "PASSIVE" if passive else "default",
                               **measure(what, threads, passive, args.pretrain_steps, args.timeout)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Median seconds (and median load average before) per (what, load, threads, policy)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["what"], row["load"], row["threads"], row["omp_wait_policy"])
        groups.setdefault(key, []).append(row)
    table = []
    for (what, load, threads, policy), group in groups.items():
        times = [r["seconds"] for r in group if r["seconds"] is not None]
        table.append({
            "what": what, "load": load, "threads": threads, "OMP_WAIT_POLICY": policy,
            "runs": len(group), "median s": statistics.median(times) if times else None,
            "all s": ", ".join(r["status"] if r["seconds"] is None else f"{r['seconds']:.1f}" for r in group),
            "load avg before": ", ".join(f"{r['load_before']:.2f}" for r in group),
        })
    return table


def write(payload: dict, name: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    table = payload["summary"]
    cols = list(table[0]) if table else []
    lines = [f"# {name}", "", f"{payload['environment']}", "", f"Command: `{payload['command']}`", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        lines.append("| " + " | ".join("" if row[c] is None else (f"{row[c]:.1f}" if isinstance(row[c], float)
                                                                    else str(row[c])) for c in cols) + " |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", nargs="+", choices=("pretrain", "demo"), default=["pretrain", "demo"])
    parser.add_argument("--settings", nargs="+", default=["2", "1"],
                        help="thread settings: N or N:passive (default: 2 1)")
    parser.add_argument("--loads", nargs="+", choices=("idle", "busy"), default=["idle", "busy"])
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pretrain-steps", type=int, default=150, help="steps of the pretrain runs (default 150, --quick's)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is cut off")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to those of the existing results file (e.g. a pretrain run then a demo run)")
    parser.add_argument("--quick", action="store_true", help="smoke run: pretraining only, 20 steps, 1 thread, idle")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go (default benchmarks/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_pretrain(args.threads, args.pretrain_steps, args.cache)
    if args.quick:
        args.what, args.settings, args.loads, args.rounds, args.pretrain_steps = ["pretrain"], ["1"], ["idle"], 1, 20
    import torch

    environment = {"torch": torch.__version__, "default threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                   "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    name = "bench_busy_demo_smoke" if args.quick else "bench_busy_demo"
    command = " ".join(["bench_busy_demo.py", *(argv or sys.argv[1:])])
    rows = run(args)
    if args.append and (args.out_dir / f"{name}.json").exists():
        before = json.loads((args.out_dir / f"{name}.json").read_text())
        rows = before["rows"] + rows
        command = before["command"] + "` then `" + command
    payload = {"environment": environment, "command": command, "rows": rows, "summary": summarize(rows)}
    write(payload, name, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
