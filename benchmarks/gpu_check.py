"""One prepared script for a session that is lent a GPU: CPU/CUDA parity tests, then the
benchmarks on CUDA; everything lands under benchmarks/results/ (commit it).

    PYTHONPATH=.:benchmarks python benchmarks/gpu_check.py [--budget-s 480]

Steps (each in its own subprocess, each time-boxed so that a slow step cannot eat the rest):
1. ``pytest tests/test_gpu.py tests/test_hooks.py tests/test_scoring.py`` -> results/gpu_pytest.txt
2. ``bench_grads.py --device cuda``                      -> results/bench_grads_cuda.{json,md}
3. ``bench_scoring.py --device cuda`` (MLP 10k x 100, LM 2k x 50, kronfluence if importable)
                                                          -> results/bench_scoring_cuda.{json,md}
A summary of return codes and durations goes to results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def step(name, cmd, timeout, log):
    t = time.time()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}")
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout or "")
    (RESULTS / log).write_text(out)
    print(f"{name}: rc={rc} in {time.time() - t:.0f}s", flush=True)
    return {"step": name, "rc": rc, "seconds": round(time.time() - t, 1), "log": log}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=480)
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch

    info = {"cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "steps": []}
    if not info["cuda"]:
        print("No CUDA device: nothing to check.", flush=True)
    else:
        py = sys.executable
        b = a.budget_s
        info["steps"].append(step("pytest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "tests/test_hooks.py", "tests/test_scoring.py"], 0.3 * b, "gpu_pytest.txt"))
        info["steps"].append(step("bench_grads", [py, "benchmarks/bench_grads.py", "--device", "cuda"], 0.25 * b, "gpu_bench_grads.txt"))
        info["steps"].append(step("bench_scoring", [py, "benchmarks/bench_scoring.py", "--device", "cuda"], 0.45 * b, "gpu_bench_scoring.txt"))
    (RESULTS / "gpu_check.json").write_text(json.dumps(info, indent=2))
    if os.environ.get("OUT"):  # the device runner brings back only what is under $OUT
        import shutil

        shutil.copytree(RESULTS, Path(os.environ["OUT"]) / "results", dirs_exist_ok=True)


if __name__ == "__main__":
    main()
