"""LDS and noisy-label AUC of every curvature and baseline on data that needs no download.

A dattri-style table (dattri: "Dattri: A Library for Efficient Data Attribution", 2024) for:

- datasets: scikit-learn's bundled ``load_digits`` (8x8 images, 10 classes) and a generated
  MNIST-shaped set (28x28 images of 10 synthetic classes, :func:`mnist_shaped`);
- models: multinomial logistic regression and a one-hidden-layer MLP (32 tanh units);
- methods: every curvature in ``influence.CURVATURES`` (so curvatures merged later are picked
  up) inside ``InfluenceEstimator``, plus the baselines (gradient dot/cosine, TracIn, TRAK,
  RepSim).

Protocol (also written next to the table):

- training objective ``mean CE + (λ/2)‖θ‖²`` with ``λ = 1e-3``, float64; the curvatures use
  ``damping = λ`` (so ``Exact`` is the exact influence of the regularised objective) and
  Gauss-Newton where a curvature has ``curvature_type``; ``Identity`` keeps ``damping = 1``
  (gradient dot product).
- logistic regression: SciPy L-BFGS-B on the closed-form gradient to a max-abs gradient below 1e-9;
  retraining warm-starts from the full-data optimum (convex and deterministic, so one seed).
  MLP: full-batch Adam (lr 1e-2, ``--mlp-steps`` steps) from a seeded initialisation;
  retraining from scratch with ``--seeds`` seeds per subset, outputs averaged.
- LDS: ``--subsets`` random half-subsets; outputs are the retrained models' test losses
  (the attributed measurement); Spearman per query, mean over queries, 95 % bootstrap
  interval over queries.
- noisy-label AUC: 10 % of training labels flipped, the model retrained on the noisy set, and
  each method's self-influence used to rank training examples; ROC-AUC against the flips
  ("n/a" for cosine similarities, whose self-score is 1 by construction).
- TracIn: 5 checkpoints of the training trajectory (L-BFGS has no step size, so for logistic
  regression the checkpoints come from a separate full-batch gradient-descent run, lr 0.5);
  TRAK: ``k = min(512, P)`` Gaussian projection, an ensemble of 3 models (seeds 0-2; for the
  convex logistic regression they coincide and the ensemble averages projections only);
  RepSim: cosine of the inputs (logistic regression) or of the hidden layer (MLP).
- times: wall-clock seconds of ``fit`` and of ``pairwise_scores`` on the queries, on a shared
  2-core CPU (other jobs ran at the same time: read them as rough).
- budget: every method runs with its library defaults (e.g. LiSSA depth 1000, CG 100
  iterations) under a wall-clock budget (``--method-timeout``, 300 s) covering its LDS fit and
  scores and its noisy-label self-scores; a method over budget is reported as timed out.

Usage::

    PYTHONPATH=. python benchmarks/lds_offline.py            # full run, writes results/
    PYTHONPATH=. python benchmarks/lds_offline.py --smoke    # seconds, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy/torch: oversubscribed threads ran 10x slower

import platform
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import influence
from influence import (
    TRAK,
    ClassificationTask,
    GradientSimilarity,
    Identity,
    InfluenceEstimator,
    RepresentationSimilarity,
    TracIn,
)
from influence.evaluation import linear_datamodeling_score, random_subset_masks, roc_auc

DT = torch.float64
LAM = 1e-3
TASK = ClassificationTask()
RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- data
def digits(n_train: int, n_test: int, seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=DT)
    y = torch.tensor(y[order], dtype=torch.long)
    return x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test]


def mnist_shaped(n_train: int, n_test: int, seed: int = 0):
    """28x28 images: each class is 3 Gaussian strokes at class-specific places; examples are the
    prototype shifted by up to 3 pixels, rescaled in intensity and with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij"), -1)
    prototypes = []
    for _ in range(10):
        img = torch.zeros(28, 28)
        for _ in range(3):
            centre = 6 + 16 * torch.rand(2, generator=g)
            width = 1.5 + 3 * torch.rand(2, generator=g)
            img += torch.exp(-(((grid - centre) / width) ** 2).sum(-1) / 2)
        prototypes.append(img.clamp(max=1))
    n = n_train + n_test
    y = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    scale = 0.6 + 0.8 * torch.rand(n, generator=g)
    x = torch.stack([torch.roll(prototypes[c], tuple(s.tolist()), (0, 1)) for c, s in zip(y.tolist(), shifts)])
    x = (x * scale[:, None, None] + 0.35 * torch.randn(n, 28, 28, generator=g)).clamp(0, 1)
    x = x.reshape(n, 784).to(DT)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ----------------------------------------------------------------------------- training
def objective(model, x, y):
    flat = torch.cat([p.reshape(-1) for p in model.parameters()])
    return TASK.loss(model, (x, y)).mean() + 0.5 * LAM * flat.dot(flat)


def make_model(kind: str, d_in: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "logreg":
        model = nn.Linear(d_in, 10)
        nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    else:
        model = nn.Sequential(nn.Linear(d_in, 32), nn.Tanh(), nn.Linear(32, 10))
    return model.to(DT)


def train_logreg(model, x, y, tol=1e-9):
    """Minimises the objective with SciPy's L-BFGS-B on the closed-form gradient (numpy: far
    less overhead per iteration than torch.optim), to a max-abs gradient below ``tol``."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    X = np.concatenate([x.numpy(), np.ones((len(x), 1))], 1)
    Y = np.eye(10)[y.numpy()]
    theta0 = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], 1).numpy().ravel()

    def fun(theta):
        T = theta.reshape(10, -1)
        logp = log_softmax(X @ T.T, axis=1)
        loss = -(logp * Y).sum() / len(X) + 0.5 * LAM * theta @ theta
        grad = (np.exp(logp) - Y).T @ X / len(X) + LAM * T
        return loss, grad.ravel()

    res = minimize(fun, theta0, jac=True, method="L-BFGS-B",
                   options={"gtol": tol, "ftol": 0, "maxiter": 20000, "maxcor": 30})
    T = torch.from_numpy(res.x.reshape(10, -1))
    with torch.no_grad():
        model.weight.copy_(T[:, :-1])
        model.bias.copy_(T[:, -1])
    model.max_grad_ = float(np.abs(fun(res.x)[1]).max())
    return model.eval()


def train_adam(model, x, y, steps, checkpoints=0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    saved, every = [], max(1, steps // max(checkpoints, 1))
    for step in range(1, steps + 1):
        opt.zero_grad()
        objective(model, x, y).backward()
        opt.step()
        if checkpoints and step % every == 0:
            saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model.eval(), saved


def gd_checkpoints(kind, x, y, n=5, steps=100, lr=0.5):
    model = make_model(kind, x.shape[1], 0)
    saved = []
    for step in range(1, steps + 1):
        model.zero_grad()
        objective(model, x, y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        if step % (steps // n) == 0:
            saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return saved, lr


@dataclass
class Trained:
    model: nn.Module
    checkpoints: list
    rate: float
    ensemble: list = field(default_factory=list)


def train_full(kind, x, y, args) -> Trained:
    if kind == "logreg":
        model = train_logreg(make_model(kind, x.shape[1], 0), x, y)
        saved, rate = gd_checkpoints(kind, x, y)
        return Trained(model, saved, rate, [model] * 3)
    model, saved = train_adam(make_model(kind, x.shape[1], 0), x, y, args.mlp_steps, checkpoints=5)
    others = [train_adam(make_model(kind, x.shape[1], s), x, y, args.mlp_steps)[0] for s in (1, 2)]
    return Trained(model, saved, 1e-2, [model, *others])


def retrain_outputs(kind, x, y, xq, yq, masks, full: Trained, args) -> np.ndarray:
    """(n_subsets, n_test) query losses of the models retrained on each subset."""
    import copy

    outputs = []
    for s, mask in enumerate(masks):
        idx = torch.from_numpy(np.flatnonzero(mask))
        runs = []
        for seed in ([0] if kind == "logreg" else range(args.seeds)):
            if kind == "logreg":
                model = train_logreg(copy.deepcopy(full.model), x[idx], y[idx])
            else:
                model = train_adam(make_model(kind, x.shape[1], 1000 * s + seed), x[idx], y[idx], args.mlp_steps)[0]
            with torch.no_grad():
                runs.append(TASK.loss(model, (xq, yq)).numpy())
        outputs.append(np.mean(runs, 0))
        print(f"\r  retrained {s + 1}/{len(masks)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return np.array(outputs)


# ----------------------------------------------------------------------------- methods
def curvature_methods():
    """One estimator per registered curvature, with the benchmark's damping."""
    out = {}
    for cls in influence.CURVATURES:
        if cls is Identity:
            out["Identity (grad dot)"] = lambda trained, cls=cls: InfluenceEstimator(cls(), score_dtype=DT)
            continue

        def make(trained, cls=cls):
            cur = cls(damping=LAM)
            if "curvature_type" in cur.get_params():
                cur.set_params(curvature_type="ggn")
            return InfluenceEstimator(cur, score_dtype=DT)

        out[cls.__name__] = make
    return out


def baseline_methods(kind, args):
    hidden = "1" if kind == "mlp" else (lambda model, batch: batch[0])
    return {
        "GradientSimilarity (dot)": lambda t: GradientSimilarity("dot"),
        "GradientSimilarity (cosine)": lambda t: GradientSimilarity("cosine"),
        "TracIn (5 ckpts)": lambda t: TracIn(t.checkpoints, t.rate),
        "TRAK (ensemble 3)": lambda t: TRAK(
            projection_dim=min(args.proj, sum(p.numel() for p in t.model.parameters())),
            damping=LAM, models=t.ensemble,
        ),
        "RepSim (cosine)": lambda t: RepresentationSimilarity(hidden),
    }


def run_method(make, trained, train, test):
    method = make(trained)
    t0 = time.perf_counter()
    method.fit(trained.model, train)
    t1 = time.perf_counter()
    scores = method.pairwise_scores(test)
    t2 = time.perf_counter()
    return scores.double().numpy(), t1 - t0, t2 - t1


class MethodTimeout(Exception):
    """A method ran past ``--method-timeout``."""


def _alarm(signum, frame):
    raise MethodTimeout


def bench(dataset_name, kind, data, args):
    x, y, xq, yq = data
    n = len(y)
    train = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, n, args.batch)]
    test = [(xq, yq)]
    print(f"{dataset_name} / {kind}: training", file=sys.stderr)
    full = train_full(kind, x, y, args)
    masks = random_subset_masks(n, args.subsets, 0.5, seed=0)
    t0 = time.perf_counter()
    outputs = retrain_outputs(kind, x, y, xq, yq, masks, full, args)
    retrain_s = time.perf_counter() - t0
    # noisy labels: 10 % flipped to another class, model retrained on the noisy set
    g = np.random.default_rng(1)
    flipped = np.zeros(n, bool)
    flipped[g.choice(n, n // 10, replace=False)] = True
    y_noisy = y.clone()
    y_noisy[flipped] = (y[flipped] + torch.from_numpy(g.integers(1, 10, flipped.sum()))) % 10
    noisy = train_full(kind, x, y_noisy, args)
    noisy_train = [(x[i : i + args.batch], y_noisy[i : i + args.batch]) for i in range(0, n, args.batch)]

    GradientSimilarity().fit(full.model, train[:1]).self_scores(train[:1])  # warm-up, untimed
    rows = []
    methods = {**curvature_methods(), **baseline_methods(kind, args)}
    for name, make in methods.items():
        row = {"dataset": dataset_name, "model": kind, "method": name,
               "num_params": sum(p.numel() for p in full.model.parameters())}
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(args.method_timeout)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores, fit_s, score_s = run_method(make, full, train, test)
                lds = linear_datamodeling_score(scores, masks, outputs, seed=0)
                est = make(noisy).fit(noisy.model, noisy_train)
                self_scores = est.self_scores().double().numpy()
                # cosine similarities give self-scores of 1 by construction: no ranking
                constant = np.ptp(self_scores) <= 1e-9 * np.abs(self_scores).max()
                auc = None if constant else roc_auc(self_scores, flipped)
            row.update(lds=lds.mean, lds_low=lds.ci_low, lds_high=lds.ci_high, noisy_auc=auc,
                       fit_s=fit_s, score_s=score_s)
        except MethodTimeout:
            row["error"] = f"timed out (over the {args.method_timeout} s budget at library defaults)"
        except Exception as error:  # recorded in the table, e.g. a curvature too large
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        print(f"  {name:<30} {_cell(row)}", file=sys.stderr)
        rows.append(row)
    return rows, retrain_s


def _cell(row):
    if "error" in row:
        return "skipped: " + row["error"]
    return (f"LDS {row['lds']:.3f} [{row['lds_low']:.3f}, {row['lds_high']:.3f}]  AUC "
            f"{_auc(row['noisy_auc'])}  fit {row['fit_s']:.2f}s  score {row['score_s']:.2f}s")


def _auc(value):
    return "n/a" if value is None else f"{value:.3f}"


def markdown(rows, meta) -> str:
    lines = [
        "# LDS and noisy-label AUC on offline data",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, torch {meta['torch']}, "
        f"{meta['threads']} threads, total {meta['total_s']:.0f} s on a shared 2-core CPU).",
        "",
        "## Protocol",
        "",
        *[f"- {line}" for line in meta["protocol"]],
        "",
        "## Results",
        "",
        "| dataset | model | P | method | LDS [95% CI] | noisy-label AUC | fit s | score s |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['model']} | {r['num_params']} | {r['method']} | "
                         f"skipped: {r['error']} | | | |")
        else:
            lines.append(
                f"| {r['dataset']} | {r['model']} | {r['num_params']} | {r['method']} | "
                f"{r['lds']:.3f} [{r['lds_low']:.3f}, {r['lds_high']:.3f}] | {_auc(r['noisy_auc'])} | "
                f"{r['fit_s']:.2f} | {r['score_s']:.2f} |"
            )
    lines += [
        "",
        "Rows marked skipped are methods that refused the problem (``Exact`` keeps a dense P x P "
        "matrix only up to 5,000 parameters) or ran past the per-method budget. The method list is read from "
        "``influence.CURVATURES`` at run time, so curvatures merged later appear on a rerun.",
    ]
    if "cpu_s" in meta:
        lines += ["", f"CPU time of the whole run: {meta['cpu_s']:.0f} s (process time)."]
    lines += ["", "Retraining time per (dataset, model): " + ", ".join(
        f"{k} {v:.0f} s" for k, v in meta["retrain_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run in seconds; writes nothing")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2, help="MLP training seeds per subset")
    parser.add_argument("--mlp-steps", type=int, default=200)
    parser.add_argument("--proj", type=int, default=512)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy 2-core box)")
    parser.add_argument("--method-timeout", type=int, default=300, help="wall-clock seconds per method (fit, scores, self-scores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.n_train, args.n_test, args.subsets, args.seeds = 60, 8, 6, 1
        args.mlp_steps, args.proj, args.batch = 30, 16, 32
    start, cpu_start = time.perf_counter(), time.process_time()
    rows, retrain = [], {}
    for dataset_name, loader in (("digits", digits), ("mnist-shaped", mnist_shaped)):
        data = loader(args.n_train, args.n_test)
        for kind in ("logreg", "mlp"):
            r, s = bench(dataset_name, kind, data, args)
            rows += r
            retrain[f"{dataset_name}/{kind}"] = s
    protocol = [
        line.strip()[2:] if line.strip().startswith("- ") else line.strip()
        for line in __doc__.split("Protocol (also written next to the table):")[1].split("Usage::")[0].strip().split("\n-")
    ]
    protocol = [" ".join(p.split()) for p in protocol]
    protocol.insert(0, f"{args.n_train} training examples, {args.n_test} queries per dataset; "
                       f"{args.subsets} half-subsets; MLP {args.mlp_steps} Adam steps, "
                       f"{args.seeds} seeds per subset.")
    meta = {
        "command": "PYTHONPATH=. python benchmarks/lds_offline.py" + (" --smoke" if args.smoke else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "total_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,
        "retrain_s": retrain, "protocol": protocol, "args": {k: str(v) for k, v in vars(args).items()},
    }
    text = markdown(rows, meta)
    print(text)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lds_offline.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (args.out / "lds_offline.md").write_text(text)


if __name__ == "__main__":
    main()
