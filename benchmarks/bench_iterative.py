"""Time and iHVP residual of CG, LiSSA and Arnoldi versus iterations / depth / rank.

Problems (float64-free: float32 models, as users run them):
- an MLP of ~94k parameters (100 → 256 → 256 → 10) on 256 random examples, GGN curvature;
- the TinyLM (2 layers, d_model 16, vocab 50) on 32 random sequences of 12 tokens, GGN.

For each method and budget the script fits, solves ``(C + λI) X = G`` for 8 random query
gradients, and reports wall time (fit + solve) and the relative residual
``‖(C + λI) x − g‖ / ‖g‖`` against the exact matrix-free operator (``residual``; its own
operator pass is not timed). Writes ``benchmarks/results/bench_iterative.json`` and ``.md``.

Section ``pcg`` (preconditioned CG, float64, real query gradients as right-hand sides): on the
trained MLP classifier of ``compare_kronfluence.py`` (1,732 parameters, 1,000 examples) and the
TinyLM above, CG plain and preconditioned by ``Diagonal``, ``KFAC`` and ``EKFAC`` (each fitted
once, ``fisher_type`` as named): fit time, iterations and time to ``rtol=1e-6``, and at fixed
budgets of 1-20 iterations the residual, the error against the converged solution and the mean
per-query Pearson of the scores against exact influence (CG to ``rtol=1e-10``). On the MLP also
the best any block-diagonal preconditioner can do (the exact per-layer GGN blocks, dense) and
EK-FAC with a larger preconditioner damping. Writes ``bench_pcg.{json,md}``.

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_iterative.py          # full size (minutes)
    PYTHONPATH=$PWD python benchmarks/bench_iterative.py --smoke  # seconds; *_smoke.* files
    PYTHONPATH=$PWD python benchmarks/bench_iterative.py --sections pcg  # the PCG section only
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from influence import (
    CG, EKFAC, KFAC, Arnoldi, ClassificationTask, Diagonal, LanguageModelingTask, LiSSA, per_sample_grads,
)
from influence.curvature.cg import block_cg
from influence.lm import TinyLM, TinyLMConfig

RESULTS = Path(__file__).parent / "results"
NOTES = """
Notes: CG's residual is not monotone in max_iter (CG minimises the error in the A-norm, not
the residual). LiSSA with scale="auto" (s = 2·μ_max + λ) contracts by 1 − (μ + λ)/s per step, so
with λ = 0.01 it needs thousands of steps on these problems; depths 10–25 barely move. Arnoldi's
default off_subspace="damping" applies 1/λ to the unresolved spectrum, so its residual there is
‖C g_off‖/λ and grows with the tail of the spectrum (large on the LM); off_subspace="zero"
(Schioppa's projection) keeps the residual ≤ 1 by dropping that part instead.
"""
DAMPING = 1e-2
POWER_ITERS = 5  # LiSSA scale="auto" estimate


def mlp_problem(smoke: bool):
    torch.manual_seed(0)
    d_in, hidden, n = (10, 16, 32) if smoke else (100, 256, 256)
    model = nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
    ).eval()
    x, y = torch.randn(n, d_in), torch.randint(0, 10, (n,))
    half = n // 2
    return "mlp", model, ClassificationTask(), [(x[:half], y[:half]), (x[half:], y[half:])]


def lm_problem(smoke: bool):
    torch.manual_seed(0)
    d, n, T = (8, 8, 8) if smoke else (16, 32, 12)
    config = TinyLMConfig(vocab_size=50, d_model=d, n_layers=2, n_heads=2 if smoke else 4,
                          d_ff=2 * d, max_len=T)
    model = TinyLM(config).eval()
    ids = torch.randint(1, 50, (n, T))
    half = n // 2
    loader = [{"input_ids": ids[:half]}, {"input_ids": ids[half:]}]
    return "tiny_lm", model, LanguageModelingTask(), loader


def budgets(smoke: bool):
    if smoke:
        return {"CG": [2, 5], "LiSSA": [5, 10], "Arnoldi": [2, 5]}
    # kept small: one product costs ~0.5-4 s on the shared 2-core machine
    return {"CG": [5, 15], "LiSSA": [10, 25], "Arnoldi": [5, 10]}


def build(method: str, budget: int):
    if method == "CG":
        return CG(damping=DAMPING, curvature_type="ggn", rtol=1e-8, max_iter=budget), "max_iter"
    if method == "LiSSA":
        return LiSSA(damping=DAMPING, curvature_type="ggn", depth=budget, power_iters=POWER_ITERS), "depth"
    return Arnoldi(damping=DAMPING, curvature_type="ggn", rank=budget), "rank"


def run(problem, smoke: bool) -> list[dict]:
    name, model, task, loader = problem
    P = sum(p.numel() for p in model.parameters())
    G = torch.randn(8, P, generator=torch.Generator().manual_seed(1))
    rows = []
    for method, values in budgets(smoke).items():
        for budget in values:
            curvature, knob = build(method, budget)
            start = time.perf_counter()
            curvature.fit(model, task, loader)
            fitted = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # CG at small max_iter warns by design
                X = curvature.solve(G)
            solved = time.perf_counter()
            # residual of the X already computed, against the exact operator
            residual = (curvature.exact_matmat(X) - G).norm(dim=1) / G.norm(dim=1)
            rows.append({
                "problem": name, "num_params": P, "method": method, knob: budget,
                "budget": budget, "fit_s": round(fitted - start, 3),
                "solve_s": round(solved - fitted, 3), "total_s": round(solved - start, 3),
                "residual_median": float(residual.median()), "residual_max": float(residual.max()),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| problem | P | method | budget | fit s | solve s | total s | "
             "residual median | residual max |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knob = {"CG": "max_iter", "LiSSA": "depth", "Arnoldi": "rank"}[r["method"]]
        lines.append(
            f"| {r['problem']} | {r['num_params']} | {r['method']} | {knob}={r['budget']} | "
            f"{r['fit_s']:.2f} | {r['solve_s']:.2f} | {r['total_s']:.2f} | "
            f"{r['residual_median']:.2e} | {r['residual_max']:.2e} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ preconditioned CG
PCG_RTOL = 1e-6
PCG_BUDGETS = (1, 2, 3, 5, 10, 20)
PCG_NOTES = """
Notes: the right-hand sides are query gradients (measurement gradients of held-out examples), as
in influence, not random vectors. "exact" = plain CG to rtol 1e-10; q-Pearson = mean over queries
of the Pearson correlation, over the training examples, of the scores against exact influence.
K-FAC/EK-FAC are fitted once (fit s) and applied once per iteration. "block-diagonal GGN (dense)"
preconditions with the exact per-layer blocks of the GGN: the best any block-diagonal
preconditioner (K-FAC, EK-FAC, Diagonal) can do. It bounds what a Kronecker preconditioner buys
to a tight rtol on these networks: what it misses is the coupling between layers, whose
directions (where the layer blocks' curvature cancels in the full GGN) become the smallest
eigenvalues of the preconditioned operator (spectrum column, dense, MLP only), while the GGN
itself has most eigenvalues at λ (a low effective rank plain CG profits from).
"""


def pcg_problems(smoke: bool):
    """``(name, model, task, train loader, query batch, damping)``, float64."""
    from compare_kronfluence import make_data, make_mlp, train

    n = 200 if smoke else 1000
    x, y = make_data("mlp", n + 16, 0)
    mlp = train(make_mlp(0), x[:n], y[:n], steps=50, lr=1e-2)
    mlp_loader = [(x[i : i + 250], y[i : i + 250]) for i in range(0, n, 250)]
    out = [("mlp", mlp, ClassificationTask(), mlp_loader, (x[n:], y[n:]), d) for d in ((1e-2,) if smoke else (1e-2, 1e-3))]
    name, lm, task, loader = lm_problem(smoke)
    query = {"input_ids": torch.randint(1, 50, (8, loader[0]["input_ids"].shape[1]), generator=torch.Generator().manual_seed(2))}
    out.append(("tiny_lm", lm.double(), task, loader, query, DAMPING))
    return out


def pcg_preconditioners(name: str):
    """Fresh preconditioners to fit once; the LM's "expected" would fall back to sampling."""
    types = ("expected",) if name == "mlp" else ("true",)
    rows = [(f"Diagonal({t})", Diagonal(fisher_type=t)) for t in types]
    for cls in (KFAC, EKFAC):
        rows += [(f"{cls.__name__}({t})", cls(fisher_type=t)) for t in (("true", "expected") if name == "mlp" else types)]
    return rows


def block_diagonal_ggn(model, M: torch.Tensor, damping: float):
    """``R ↦ R (B + λI)⁻¹`` with ``B`` the exact per-layer blocks of the dense GGN ``M``."""
    B, start = torch.zeros_like(M), 0
    for module in model.modules():
        size = sum(p.numel() for p in module.parameters(recurse=False))
        B[start : start + size, start : start + size] = M[start : start + size, start : start + size]
        start += size
    inverse = torch.linalg.inv(B + damping * torch.eye(len(B), dtype=B.dtype))
    return lambda R: R @ inverse


def preconditioned_spectrum(M: torch.Tensor, damping: float, precondition) -> tuple[float, float]:
    """Smallest and largest eigenvalue of ``P⁻¹(M + λI)`` (dense; ``P⁻¹ = L Lᵀ``, ``Lᵀ(M + λI)L``)."""
    eye = torch.eye(len(M), dtype=M.dtype)
    inverse = eye if precondition is None else precondition(eye)
    L = torch.linalg.cholesky((inverse + inverse.T) / 2)
    values = torch.linalg.eigvalsh(L.T @ (M + damping * eye) @ L)
    return float(values[0]), float(values[-1])


def query_pearson(scores: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows (queries) of the Pearson correlation with the reference's row."""
    a = scores - scores.mean(1, keepdim=True)
    b = reference - reference.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())


def run_pcg(problem, smoke: bool) -> list[dict]:
    name, model, task, loader, query, damping = problem
    G = per_sample_grads(model, task, query, objective="measurement").double()
    train_grads = torch.cat([per_sample_grads(model, task, b) for b in loader]).double()
    base = CG(damping=damping, rtol=1e-10, max_iter=3000).fit(model, task, loader)
    exact = base.solve(G)
    reference = exact @ train_grads.T

    def matmat(V):
        return base.operator_.matmat(V) + damping * V

    candidates = [("none", None, 0.0)]
    for label, cur in pcg_preconditioners(name):
        start = time.perf_counter()
        cur.fit(model, task, loader)
        candidates.append((label, (lambda c: lambda R: c.solve(R, damping))(cur), time.perf_counter() - start))
        if label == "EKFAC(expected)":
            candidates.append((f"{label}, damping 10λ", (lambda c: lambda R: c.solve(R, 10 * damping))(cur), 0.0))
    M = None
    if name == "mlp":  # small enough for the dense GGN: the block-diagonal bound and the spectra
        from influence import Exact

        start = time.perf_counter()
        M = Exact(curvature_type="ggn").fit(model, task, loader).matrix_
        candidates.append(("block-diagonal GGN (dense)", block_diagonal_ggn(model, M, damping), time.perf_counter() - start))
    rows = []
    for label, precondition, fit_s in candidates:
        start = time.perf_counter()
        X, info = block_cg(matmat, G, rtol=PCG_RTOL, max_iter=3000, precondition=precondition)
        row = {"problem": name, "num_params": G.shape[1], "damping": damping, "preconditioner": label,
               "fit_s": round(fit_s, 3), "solve_s": round(time.perf_counter() - start, 3),
               "iterations_median": int(info.iterations.median()), "iterations_max": int(info.iterations.max()),
               "converged": bool(info.converged.all())}
        if M is not None:
            row["spectrum_min"], row["spectrum_max"] = preconditioned_spectrum(M, damping, precondition)
            row["ggn_eigenvalues_above_damping"] = int((torch.linalg.eigvalsh(M) > damping).sum())
        for k in PCG_BUDGETS[:3] if smoke else PCG_BUDGETS:
            Xk, info_k = block_cg(matmat, G, rtol=0.0, max_iter=k, precondition=precondition)
            row[f"residual@{k}"] = float(info_k.residuals.median())
            row[f"error@{k}"] = float(((Xk - exact).norm(dim=1) / exact.norm(dim=1)).median())
            row[f"q_pearson@{k}"] = query_pearson(Xk @ train_grads.T, reference)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def pcg_markdown(rows: list[dict], header: str) -> str:
    budgets = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("q_pearson@")})
    errors = [k for k in budgets if k in (5, 10)]
    lines = [header, "", "| problem | λ | preconditioner | fit s | iterations to 1e-6 (median / max) | solve s | "
             + " | ".join([f"q-Pearson @{k}" for k in budgets] + [f"error @{k}" for k in errors])
             + " | spectrum of P⁻¹(C+λI) |", "|" + "---|" * (7 + len(budgets) + len(errors))]
    for r in rows:
        spectrum = f"{r['spectrum_min']:.3g} – {r['spectrum_max']:.3g}" if "spectrum_min" in r else "–"
        lines.append(
            f"| {r['problem']} ({r['num_params']}) | {r['damping']:g} | {r['preconditioner']} | {r['fit_s']:.2f} | "
            f"{r['iterations_median']} / {r['iterations_max']}{'' if r['converged'] else ' (not converged)'} | {r['solve_s']:.2f} | "
            + " | ".join([f"{r[f'q_pearson@{k}']:.4f}" for k in budgets] + [f"{r[f'error@{k}']:.1e}" for k in errors])
            + f" | {spectrum} |"
        )
    ranks = {(r["problem"], r["damping"]): r["ggn_eigenvalues_above_damping"] for r in rows if "ggn_eigenvalues_above_damping" in r}
    lines += ["", "GGN eigenvalues above λ: " + ", ".join(f"{p} at λ = {d:g}: {n} of {next(r['num_params'] for r in rows if r['problem'] == p)}"
                                                    for (p, d), n in ranks.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, *_smoke output files")
    parser.add_argument("--sections", nargs="+", choices=("budgets", "pcg"), default=("budgets", "pcg"))
    args = parser.parse_args()
    suffix = "_smoke" if args.smoke else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "pcg" in args.sections:
        rows = [row for problem in pcg_problems(args.smoke) for row in run_pcg(problem, args.smoke)]
        meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
                "rtol": PCG_RTOL, "curvature_type": "ggn", "dtype": "float64"}
        (RESULTS / f"bench_pcg{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        header = (f"# bench_pcg{suffix}\n\nCG on the GGN, plain and preconditioned, float64, torch {meta['torch']}, "
                  f"{meta['threads']} threads (shared CPU: times are noisy); same run for every row.")
        (RESULTS / f"bench_pcg{suffix}.md").write_text(pcg_markdown(rows, header) + PCG_NOTES)
    if "budgets" not in args.sections:
        return
    rows = []
    for make in (mlp_problem, lm_problem):
        rows += run(make(args.smoke), args.smoke)
    meta = {
        "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "damping": DAMPING, "curvature_type": "ggn", "queries": 8, "dtype": "float32",
    }
    (RESULTS / f"bench_iterative{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (
        f"# bench_iterative{suffix}\n\nGGN, damping {DAMPING}, 8 query rows, float32 models, "
        f"torch {meta['torch']}, {meta['threads']} threads (shared CPU: times are noisy). "
        "Residual = ‖(C+λI)x − g‖/‖g‖ against the exact matrix-free operator."
    )
    (RESULTS / f"bench_iterative{suffix}.md").write_text(markdown(rows, header) + NOTES)


if __name__ == "__main__":
    main()
