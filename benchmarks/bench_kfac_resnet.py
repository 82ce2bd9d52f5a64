"""K-FAC on a ResNet-18 (torchvision's layout, widths 64-512) at 32×32 inputs (issue 16).

The last stage's 3×3 convolutions run on 1×1 maps, so their input factors ``A`` are
4,608 × 4,608 with only the centre taps' ~512 rows non-zero; LAPACK's ``eigh`` once failed to
converge on such a factor. The fit now eigendecomposes only the non-zero rows and columns
(``influence.curvature._eigh.factor_eigh``). Reported: the fit's seconds (statistics pass +
eigendecompositions), the seconds of the eigendecompositions alone (rebuilding the blocks
from the fitted statistics), the widest factors with their non-zero rows, and, with
``--full-eigh``, one plain ``torch.linalg.eigh`` of the widest ``A`` (what the fit did before).

    PYTHONPATH=.:benchmarks python benchmarks/bench_kfac_resnet.py [--smoke] [--full-eigh]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from _common import RESULTS, ResNet18, environment, write
from influence import KFAC, ClassificationTask, FallbackWarning


def run(smoke: bool = False, out_dir: Path = RESULTS, full_eigh: bool = False, n: int = 256, batch_size: int = 64) -> dict:
    widths, n, batch_size = ((4, 8, 8, 16), 8, 4) if smoke else ((64, 128, 256, 512), n, batch_size)
    torch.manual_seed(0)
    model = ResNet18(widths=widths, classes=10).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    loader = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        start = time.perf_counter()
        cur = KFAC(damping=1e-3).fit(model, ClassificationTask(), loader)  # defaults: true Fisher, BN on the diagonal
        fit_s = time.perf_counter() - start
    start = time.perf_counter()
    cur._build(cur.statistics_)
    eigh_s = time.perf_counter() - start
    factors = []
    for key, value in cur.statistics_.items():
        if value.dim() == 2 and key.endswith(("/A", "/S")):
            factors.append({"factor": key, "size": value.shape[0], "non_zero_rows": int(value.ne(0).any(0).sum())})
    factors.sort(key=lambda r: -r["size"])
    payload = {
        "environment": environment(), "smoke": smoke, "widths": widths, "n": n, "batch_size": batch_size,
        "num_params": cur.layout_.num_params, "fit_s": fit_s, "eigendecompositions_s": eigh_s,
        "widest_factors": factors[:6],
    }
    if full_eigh:
        key = factors[0]["factor"]
        M = cur.statistics_[key] / cur.statistics_[key + "_count"]
        start = time.perf_counter()
        torch.linalg.eigh(0.5 * (M + M.T))
        payload["full_eigh_widest_s"] = time.perf_counter() - start
    table = [{"widths": "-".join(map(str, widths)), "examples": n, "fit s": fit_s, "eigendecompositions s": eigh_s,
              "widest A": f"{factors[0]['size']} ({factors[0]['non_zero_rows']} non-zero rows)",
              "plain eigh of the widest A, s": payload.get("full_eigh_widest_s")}]
    write("bench_kfac_resnet" + ("_smoke" if smoke else ""), payload, table, out_dir,
          "The fit eigendecomposes each factor on its non-zero rows and columns only.")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--full-eigh", action="store_true")
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    print(run(smoke=args.smoke, full_eigh=args.full_eigh, n=args.n))
