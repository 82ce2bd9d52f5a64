"""Cost of the reverse-over-reverse fallback against forward-over-reverse curvature products.

``batch_matmat`` computes GGN/Hessian-vector products with torch.func (``jvp`` over ``grad`` /
``vjp``, vmapped over the vectors). On models where forward-mode AD fails it falls back to
plain autograd double backward, one vector at a time (``_reverse_over_reverse``). This times
both on the same batch of an MLP (float32, as users run it) for a few numbers of vectors and
checks that they agree.

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_product_modes.py          # ~1 minute
    PYTHONPATH=$PWD python benchmarks/bench_product_modes.py --smoke  # seconds; *_smoke.* files
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from influence import ClassificationTask, select_parameters
from influence.curvature._products import _forward_over_reverse, _reverse_over_reverse

RESULTS = Path(__file__).parent / "results"


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(smoke: bool = False, out_dir: Path = RESULTS) -> dict:
    torch.manual_seed(0)
    d_in, hidden, n = (10, 16, 16) if smoke else (100, 256, 128)
    model = nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
    ).eval()
    batch = (torch.randn(n, d_in), torch.randint(0, 10, (n,)))
    task, layout = ClassificationTask(), select_parameters(model)
    rows = []
    for kind in ("ggn", "hessian"):
        for vectors in ((1, 8) if smoke else (1, 8, 32)):
            V = torch.randn(vectors, layout.num_params)
            args = (kind, model, task, layout, batch, V)
            with torch.no_grad():
                forward = _forward_over_reverse(*args, None)
                reverse = _reverse_over_reverse(*args)
                t_forward = _best_of(lambda: _forward_over_reverse(*args, None), 1 if smoke else 3)
                t_reverse = _best_of(lambda: _reverse_over_reverse(*args), 1 if smoke else 3)
            rows.append({
                "curvature_type": kind, "vectors": vectors,
                "forward_s": t_forward, "reverse_s": t_reverse, "ratio": t_reverse / t_forward,
                "max_rel_diff": float((forward - reverse).norm() / forward.norm()),
            })
    out = {
        "smoke": smoke, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "num_params": layout.num_params, "batch": n, "rows": rows,
    }
    suffix = "_smoke" if smoke else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench_product_modes{suffix}.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# Curvature products: forward-over-reverse (torch.func) vs reverse-over-reverse fallback",
        "",
        f"torch {out['torch']}, {out['threads']} threads, {out['machine']}; MLP {d_in}-{hidden}-{hidden}-10 "
        f"(P = {layout.num_params}), batch {n}, float32; best of 3 after a warm-up.",
        "",
        "| curvature | vectors | forward (s) | reverse (s) | reverse / forward | rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['curvature_type']} | {r['vectors']} | {r['forward_s']:.4f} | {r['reverse_s']:.4f} | "
            f"{r['ratio']:.2f} | {r['max_rel_diff']:.1e} |"
        )
    (out_dir / f"bench_product_modes{suffix}.md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    print(json.dumps(run(parser.parse_args().smoke)["rows"], indent=1))
