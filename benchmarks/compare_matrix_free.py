"""Side by side: our Exact / CG / Arnoldi against pyDVL's and curvlinops' on one small MLP.

The problem of issue 15 (item 7): a float32 MLP 20 → 64 → 5 (tanh; 1,669 parameters) trained
briefly with weight decay on 1,050 generated examples; 1,000 training examples in a
non-shuffled DataLoader of batch size 40, 50 queries; damping ``λ`` (absolute, on the curvature
of the **mean** loss). Every method fits on the training loader and computes the ``(50, 1000)``
pairwise scores. Methods:

- ours: ``Exact`` (``"hessian"``, ``"ggn"``), ``CG`` (``"hessian"``, ``"ggn"``), ``Arnoldi``
  at full rank (``rank = num_iters = P``, ``"hessian"``), through ``InfluenceEstimator``;
- pyDVL 0.10: ``DirectInfluence`` (dense Hessian by ``torch.func.hessian`` per batch),
  ``CgInfluence(solve_simultaneously=True)`` (its block CG), ``ArnoldiInfluence`` at rank
  ``P − 1`` (ARPACK's limit);
- curvlinops 3.0.1: ``HessianLinearOperator @ I`` and ``GGNLinearOperator @ I`` (the dense
  matrix from batched products), then a Cholesky solve and the scores from ``torch.func``
  gradients (curvlinops has no scoring).

The batch size divides the training set because pyDVL's CG and Arnoldi operators average the
batches' mean curvatures with equal weights (a smaller last batch would count as much as a full
one, and they would solve a slightly different system: ~5e-2 score error at batch size 32).

Each method runs in its own process (``--worker``), one after the other, rounds interleaved
(``--repeats``), all with the same thread count, so that a busy machine slows all alike. Times:
``build`` = the curvature fit (the dense matrix, or Lanczos/ARPACK; ~0 for CG), ``total`` =
fit + scores (incl. CG's solves), ``total cpu`` = the process's CPU time over the same span
(less sensitive to other load than wall time); medians over rounds. Every method's scores are
compared with a float64 oracle (the dense Hessian/GGN by ``torch.func.hessian``/Jacobians and
``torch.linalg.solve``): relative error after aligning the sign convention (pyDVL reports
``−score``).

pyDVL and curvlinops are benchmark-only dependencies, installed apart from the project, e.g.::

    pip install --target /tmp/mfpkgs --no-deps pydvl==0.10.0 curvlinops-for-pytorch==3.0.1 \\
        einconv opt-einsum backpack-for-pytorch linear_operator jaxtyping wadler_lindig \\
        pyDeprecate more-itertools dask distributed toolz partd locket tblib zict msgpack \\
        tornado importlib-metadata zipp lazy-importer zarr donfig numcodecs google-crc32c pandas
    PYTHONPATH=$PWD:/tmp/mfpkgs python benchmarks/compare_matrix_free.py --threads 2 --repeats 3

Writes ``benchmarks/results/compare_matrix_free.{json,md}``.
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
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, environment, write  # noqa: E402

N_TRAIN, N_TEST, D_IN, HIDDEN, CLASSES = 1000, 50, 20, 64, 5
DAMPING = 0.1
RTOL = 1e-6  # CG, both libraries
METHODS = {
    "exact_hessian": ("ours", "Exact('hessian')"),
    "exact_ggn": ("ours", "Exact('ggn')"),
    "cg_hessian": ("ours", "CG('hessian')"),
    "cg_ggn": ("ours", "CG('ggn')"),
    "arnoldi_full": ("ours", "Arnoldi('hessian', rank=P)"),
    "pydvl_direct": ("pyDVL", "DirectInfluence (hessian)"),
    "pydvl_cg": ("pyDVL", "CgInfluence block CG (hessian)"),
    "pydvl_arnoldi": ("pyDVL", "ArnoldiInfluence rank=P-1 (hessian)"),
    "curvlinops_hessian": ("curvlinops", "HessianLinearOperator @ I"),
    "curvlinops_ggn": ("curvlinops", "GGNLinearOperator @ I"),
}
ORACLE_OF = {name: "ggn" if name.endswith("ggn") else "hessian" for name in METHODS}


# --------------------------------------------------------------------------------- problem
def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def make_problem(path: Path, seed: int = 0) -> None:
    """Generates the data, trains the model (Adam, weight decay) and saves both to ``path``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, D_IN, generator=g)
    teacher = torch.randn(D_IN, CLASSES, generator=g)
    y = torch.distributions.Categorical(logits=2 * torch.tanh(x @ teacher)).sample()
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x[:N_TRAIN]), y[:N_TRAIN]).backward()
        opt.step()
    torch.save({"x": x, "y": y, "state": model.state_dict()}, path)


def load_problem(path: Path):
    saved = torch.load(path, weights_only=True)
    model = make_model()
    model.load_state_dict(saved["state"])
    x, y = saved["x"], saved["y"]
    return model.eval(), (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def loader(x, y, batch_size):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def oracle_scores(path: Path, curvature_type: str) -> torch.Tensor:
    """``G_test (C + λI)⁻¹ G_trainᵀ`` in float64 from the dense matrix of the mean loss."""
    model, (x, y), (xt, yt) = load_problem(path)
    model = model.double()
    x, xt = x.double(), xt.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(flat):
        out, start = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[start : start + s.numel()].view(s)
            start += s.numel()
        return out

    def logits(flat, inputs):
        return torch.func.functional_call(model, unflat(flat), (inputs,))

    if curvature_type == "hessian":
        C = torch.func.hessian(lambda t: F.cross_entropy(logits(t, x), y))(theta)
    else:
        J = torch.func.jacrev(lambda t: logits(t, x))(theta)  # (N, K, P)
        p = torch.softmax(logits(theta, x), 1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        C = torch.einsum("nkp,nkl,nlq->pq", J, H, J) / len(x)
    C = 0.5 * (C + C.T) + DAMPING * torch.eye(len(theta), dtype=torch.float64)

    def grads(inputs, labels):
        one = lambda t, a, b: F.cross_entropy(logits(t, a[None]), b[None])
        return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(theta, inputs, labels)

    return grads(xt, yt) @ torch.linalg.solve(C, grads(x, y).T)


# --------------------------------------------------------------------------------- workers
def run_ours(name, model, train, test, batch_size):
    from influence import CG, Arnoldi, ClassificationTask, Exact, InfluenceEstimator

    P = sum(p.numel() for p in model.parameters())
    curvature = {
        "exact_hessian": lambda: Exact(DAMPING, "hessian"),
        "exact_ggn": lambda: Exact(DAMPING, "ggn"),
        "cg_hessian": lambda: CG(DAMPING, "hessian", rtol=RTOL, max_iter=500),
        "cg_ggn": lambda: CG(DAMPING, "ggn", rtol=RTOL, max_iter=500),
        "arnoldi_full": lambda: Arnoldi(DAMPING, rank=P, curvature_type="hessian"),
    }[name]()
    start = time.perf_counter()
    est = InfluenceEstimator(curvature, ClassificationTask(), progress=False)
    est.fit(model, loader(*train, batch_size))
    built = time.perf_counter()
    scores = est.pairwise_scores(loader(*test, N_TEST), loader(*train, batch_size))
    return scores, built - start, time.perf_counter() - start


def run_pydvl(name, model, train, test, batch_size):
    from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, DirectInfluence

    P = sum(p.numel() for p in model.parameters())
    make = {
        "pydvl_direct": lambda: DirectInfluence(model, F.cross_entropy, DAMPING),
        "pydvl_cg": lambda: CgInfluence(
            model, F.cross_entropy, DAMPING, rtol=RTOL, atol=0.0, maxiter=500, solve_simultaneously=True
        ),
        "pydvl_arnoldi": lambda: ArnoldiInfluence(model, F.cross_entropy, DAMPING, rank=P - 1),
    }[name]
    start = time.perf_counter()
    infl = make().fit(loader(*train, batch_size))
    built = time.perf_counter()
    scores = infl.influences(*test, *train)
    return scores, built - start, time.perf_counter() - start


def run_curvlinops(name, model, train, test, batch_size):
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    params = [p for p in model.parameters()]
    cls = HessianLinearOperator if name == "curvlinops_hessian" else GGNLinearOperator
    start = time.perf_counter()
    op = cls(model, nn.CrossEntropyLoss(), params, loader(*train, batch_size), check_deterministic=False)
    C = op @ torch.eye(op.shape[0])
    built = time.perf_counter()
    L = torch.linalg.cholesky(C.double() + DAMPING * torch.eye(C.shape[0], dtype=torch.float64))
    names = [n for n, _ in model.named_parameters()]
    detached = {n: p.detach() for n, p in model.named_parameters()}

    def grads(x, y):
        one = lambda ps, a, b: F.cross_entropy(torch.func.functional_call(model, ps, (a[None],)), b[None])
        g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(detached, x, y)
        return torch.cat([g[n].reshape(len(x), -1) for n in names], 1).double()

    scores = grads(*test) @ torch.cholesky_solve(grads(*train).T, L)
    return scores, built - start, time.perf_counter() - start


def worker(name: str, problem: Path, out: Path, threads: int, batch_size: int) -> None:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    model, train, test = load_problem(problem)
    library = METHODS[name][0]
    run = {"ours": run_ours, "pyDVL": run_pydvl, "curvlinops": run_curvlinops}[library]
    cpu = time.process_time()
    scores, build, total = run(name, model, train, test, batch_size)
    cpu = time.process_time() - cpu
    torch.save(torch.as_tensor(scores).detach().double(), out)
    print(json.dumps({"build_s": build, "total_s": total, "cpu_s": cpu}))


# --------------------------------------------------------------------------------- driver
def relative_error(scores: torch.Tensor, oracle: torch.Tensor) -> float:
    sign = 1.0 if float((scores * oracle).sum()) >= 0 else -1.0  # pyDVL reports -score
    return float((sign * scores - oracle).norm() / oracle.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker")
    parser.add_argument("--problem", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--once", default="pydvl_arnoldi", help="methods run in the first round only (slow ones)")
    parser.add_argument("--name", default="compare_matrix_free")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.problem, args.out, args.threads, args.batch_size)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    times: dict[str, list[dict]] = {m: [] for m in methods}
    errors: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        problem = Path(tmp) / "problem.pt"
        make_problem(problem)
        oracles = {t: oracle_scores(problem, t) for t in ("hessian", "ggn")}
        for round_ in range(args.repeats):
            for name in methods:
                if round_ and name in args.once.split(","):
                    continue
                out = Path(tmp) / f"{name}.pt"
                cmd = [sys.executable, __file__, "--worker", name, "--problem", str(problem), "--out", str(out),
                       "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
                try:
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    times[name].append({"timeout": args.timeout})
                    print(f"round {round_} {name}: timeout {args.timeout:g} s", flush=True)
                    continue
                if done.returncode != 0:
                    tail = done.stderr.strip().splitlines()[-3:]
                    times[name].append({"error": " | ".join(tail)})
                    print(f"round {round_} {name}: failed: {tail}", flush=True)
                    continue
                record = json.loads(done.stdout.strip().splitlines()[-1])
                times[name].append(record)
                errors[name] = relative_error(torch.load(out, weights_only=True), oracles[ORACLE_OF[name]])
                print(f"round {round_} {name}: build {record['build_s']:.2f} s, total "
                      f"{record['total_s']:.2f} s, cpu {record['cpu_s']:.2f} s, score error "
                      f"{errors[name]:.2e}", flush=True)
    rows = []
    for name in methods:
        ok = [r for r in times[name] if "total_s" in r]
        failed = [r for r in times[name] if "total_s" not in r]
        rows.append({
            "library": METHODS[name][0], "method": METHODS[name][1], "key": name,
            "build s": statistics.median(r["build_s"] for r in ok) if ok else None,
            "total s": statistics.median(r["total_s"] for r in ok) if ok else None,
            "total cpu s": statistics.median(r["cpu_s"] for r in ok) if ok else None,
            "rounds": len(ok), "score rel. error": errors.get(name),
            "note": "; ".join(str(next(iter(r.values()))) for r in failed)[:120] or None,
        })
    payload = {"environment": environment(), "threads": args.threads, "batch_size": args.batch_size,
               "damping": DAMPING, "cg_rtol": RTOL, "repeats": args.repeats, "runs": times, "rows": rows}
    notes = (f"Problem: float32 MLP {D_IN}→{HIDDEN}→{CLASSES} (1,669 parameters), {N_TRAIN} training "
             f"examples in batches of {args.batch_size}, {N_TEST} queries, damping {DAMPING}, CG rtol "
             f"{RTOL:g}; {args.threads} threads per process, one process per method and round, "
             f"rounds interleaved; medians over {args.repeats} rounds ({args.once or 'none'}: the first "
             "only). `score rel. error`: "
             "‖S − S_oracle‖/‖S‖ against float64 dense scores (sign aligned).")
    write(args.name, payload, rows, RESULTS, notes)


if __name__ == "__main__":
    main()
