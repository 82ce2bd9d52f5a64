"""GGN products through the kept output Jacobian against the plain products, by model size.

For MLPs ``d_in → hidden → K`` (tanh, float32) and one batch of 40 examples, the time of
``C_b V`` for 50 vectors (a CG iteration) and for 1 vector (Lanczos, power iteration) by

- the kept linearisation (:class:`~influence.curvature._linearized.OutputJacobian`: two matrix
  products with ``J`` and a batched ``K × K`` one), and the time to build it;
- the plain product (:func:`~influence.curvature._products.batch_matmat`: a tangent forward
  pass, the output loss's Hessian, a backward pass);

with the decision of :func:`~influence.curvature._linearized.jacobian_pays_off` (which
``CurvatureOperator`` follows). Writes ``benchmarks/results/bench_linearized.{json,md}``.

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_linearized.py          # about a minute
    PYTHONPATH=$PWD python benchmarks/bench_linearized.py --smoke  # seconds; *_smoke.* files
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from _common import RESULTS, environment, write
from influence import ClassificationTask, select_parameters
from influence.curvature import _linearized
from influence.curvature._products import batch_matmat

NOTES = """
Notes: the kept Jacobian's products cost 4·K·P flops per example and vector, the plain ones
~3·F (F = 2·P forward flops for an MLP), plus a fixed cost per call of a hundred or so operator
launches. The fixed cost dominates small models (kept Jacobian faster at every K tried up to
~10), the flops large ones (plain faster with 50 vectors from P ~ 27k on, though the kept
Jacobian still wins for single vectors). `kept` is the library's choice
(jacobian_pays_off: at most 2^20 Jacobian entries per batch, or 4·K·P <= 3·F).
"""


def seconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def run(smoke: bool = False, out_dir: Path = RESULTS) -> dict:
    torch.manual_seed(0)
    task = ClassificationTask()
    cases = [(20, 64, 5), (20, 64, 16)] if smoke else [
        (20, 64, 5), (20, 64, 10), (20, 64, 16), (20, 64, 32), (100, 256, 5), (100, 256, 10), (100, 256, 32)]
    repeats = 1 if smoke else 5
    rows = []
    for d_in, hidden, K in cases:
        model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, K)).eval()
        layout = select_parameters(model)
        batch = (torch.randn(40, d_in), torch.randint(0, K, (40,)))
        V = torch.randn(50, layout.num_params)
        with torch.no_grad():
            build = seconds(lambda: _linearized.ggn_linearization(model, task, layout, batch), max(1, repeats // 2))
            entry = _linearized.ggn_linearization(model, task, layout, batch)
            row = {"P": layout.num_params, "K": K, "kept": _linearized.jacobian_pays_off(model, task, layout, batch, K),
                   "build ms": 1e3 * build}
            for n in (50, 1):
                row[f"kept {n} ms"] = 1e3 * seconds(lambda: entry.apply(V[:n]), repeats)
                row[f"plain {n} ms"] = 1e3 * seconds(lambda: batch_matmat("ggn", model, task, layout, batch, V[:n]), repeats)
        rows.append(row)
        print(row, flush=True)
    payload = {"environment": environment(), "batch": 40, "rows": rows}
    write("bench_linearized" + ("_smoke" if smoke else ""), payload, rows, out_dir, NOTES)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    run(parser.parse_args().smoke)
