"""One prepared script for a session that is lent a GPU: CPU/CUDA parity tests, then the
benchmarks on CUDA; everything lands under benchmarks/results/ (commit it).

    PYTHONPATH=.:benchmarks python benchmarks/gpu_check.py [--budget-s 450]
    PYTHONPATH=.:benchmarks python benchmarks/gpu_check.py --device cpu --smoke   # dry run here
                                               # (into a temporary folder, not results/)

Steps (each in its own subprocess, time-boxed to a share of the budget so that a slow step
cannot eat the rest; each streams its output to a log as it goes, and the benchmarks write
their tables after every row, so a step stopped at its limit keeps what it finished):

1. ``pytest tests/test_gpu.py tests/test_hooks.py tests/test_scoring.py`` -> gpu_pytest.txt
   (the CPU tests there also check the library against the device's own torch version)
2. ``bench_grads.py --device cuda``     -> bench_grads_cuda.{json,md}
3. ``bench_crossover.py --device cuda`` -> bench_crossover_cuda.{json,md} (the ghost /
   materialise crossover: is the CPU-calibrated κ right on the GPU?)
4. ``bench_scoring.py --device cuda``   -> bench_scoring_cuda.{json,md} (MLP 10k x 100,
   LM 2k x 50; kronfluence rows when it is importable)

5. with ``--full-suite-s N``: the whole test suite, which checks the library against the
   device's torch release (older than the one CI pins) -> gpu_pytest_full.txt

On one H200 (2026-11-28) the steps took 45 s, 14 s and 74 s, and the whole suite with
``-n 8`` and ``OMP_NUM_THREADS=2`` 63 s (with 16 threads per worker it had done 35 % after 100 s). The device
image has no kronfluence: carry it as wheels (``pip download --no-deps --only-binary=:all:
--python-version 3.12 -d .whl kronfluence==1.0.1 einconv``, then on the device ``pip install
--no-index --no-deps --target /tmp/site .whl/*.whl`` and ``PYTHONPATH=/tmp/site``).

A summary of return codes and durations goes to gpu_check.json. When ``$OUT`` is set (the
device runner brings back only what is under it, at most 8 files) the new files are packed
into ``$OUT/gpu_results.tar.gz`` and the summary and pytest log are also copied there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHARES = {"pytest": 0.25, "bench_grads": 0.15, "bench_crossover": 0.15, "bench_scoring": 0.45}


def step(name: str, cmd: list[str], timeout: float, log: str, results: Path) -> dict:
    """Runs ``cmd`` with its output streamed into ``results/log``; kills it after ``timeout`` s."""
    t = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    with open(results / log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
    tail = (results / log).read_text(errors="replace").splitlines()[-8:]
    print(f"{name}: rc={rc} in {time.time() - t:.0f}s (limit {timeout:.0f}s)\n  " + "\n  ".join(tail), flush=True)
    return {"step": name, "rc": rc, "seconds": round(time.time() - t, 1), "limit_s": round(timeout), "log": log}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=450)
    ap.add_argument("--device", default="cuda", help="'cpu' with --smoke: a dry run of the plumbing")
    ap.add_argument("--smoke", action="store_true", help="tiny benchmark sizes")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results on CUDA, a temporary one for a CPU dry run)")
    ap.add_argument("--full-suite-s", type=float, default=0, help="then the whole test suite, with this limit (0: skip)")
    a = ap.parse_args()
    # a CPU dry run must not overwrite the committed CUDA results
    results = a.out or (RESULTS if a.device == "cuda" else Path(tempfile.mkdtemp(prefix="gpu_check_dry_")))
    results.mkdir(parents=True, exist_ok=True)
    print("results in", results, flush=True)
    import torch

    start = time.time()
    cuda = torch.cuda.is_available()
    info = {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "steps": []}
    try:
        import kronfluence

        info["kronfluence"] = getattr(kronfluence, "__version__", "importable")
    except Exception as e:  # the benchmark then reports the error in its rows
        info["kronfluence"] = f"not importable: {type(e).__name__}: {e}"
    print(json.dumps(info), flush=True)
    if a.device == "cuda" and not cuda:
        print("No CUDA device: nothing to check.", flush=True)
    else:
        py, b = sys.executable, a.budget_s
        smoke = ["--smoke"] if a.smoke else []
        tests = ["tests/test_gpu.py", "tests/test_hooks.py", "tests/test_scoring.py"]
        info["steps"].append(step("pytest", [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests], SHARES["pytest"] * b, "gpu_pytest.txt", results))
        info["steps"].append(step("bench_grads", [py, "benchmarks/bench_grads.py", "--device", a.device, "--out", str(results), *smoke], SHARES["bench_grads"] * b, "gpu_bench_grads.txt", results))
        info["steps"].append(step("bench_crossover", [py, "benchmarks/bench_crossover.py", "--device", a.device, "--out", str(results), *smoke], SHARES["bench_crossover"] * b, "gpu_bench_crossover.txt", results))
        left = b - (time.time() - start)  # what the earlier steps did not use goes to the scoring benchmark
        info["steps"].append(step("bench_scoring", [py, "benchmarks/bench_scoring.py", "--device", a.device, "--out", str(results), *smoke], max(left, SHARES["bench_scoring"] * b), "gpu_bench_scoring.txt", results))
        if a.full_suite_s > 0:  # the whole CPU suite under the device's torch (an older release than CI's)
            xdist = ["-n", "8"] if _importable("xdist") else []
            info["steps"].append(step("pytest_full", [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *xdist], a.full_suite_s, "gpu_pytest_full.txt", results))
    (results / "gpu_check.json").write_text(json.dumps(info, indent=2))
    if os.environ.get("OUT"):
        pack(start, results, Path(os.environ["OUT"]))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pack(since: float, results: Path, out: Path) -> None:
    """Every results file written since ``since`` into one tarball under ``out`` (plus two copies)."""
    fresh = [p for p in sorted(results.iterdir()) if p.is_file() and p.stat().st_mtime >= since - 1]
    with tarfile.open(out / "gpu_results.tar.gz", "w:gz") as tar:
        for p in fresh:
            tar.add(p, arcname=p.name)
    for name in ("gpu_check.json", "gpu_pytest.txt", "gpu_pytest_full.txt"):
        if (results / name).exists():
            (out / name).write_bytes((results / name).read_bytes())
    print("packed:", [p.name for p in fresh], flush=True)


if __name__ == "__main__":
    main()
