"""Side-by-side: our KFAC/EKFAC against kronfluence's (and curvlinops', pyDVL's), all against
exact influence.

Two float64 classifiers on generated data (an MLP with ~1.7k parameters and a small CNN with
~1.8k, no BatchNorm so that every parameter is in a Linear/Conv2d layer and both libraries cover
the same parameters), 1,000 training and 50 query examples, trained briefly with Adam. For each
Fisher type (``empirical``: data labels; ``true``: sampled targets, 1 sample per example;
``expected``: the exact expectation over the classes, ours only) and the same absolute damping
(``--damping``, default ``λ = 0.1 · tr(F)/P``, F = exact empirical Fisher), we report for our
``KFAC``/``EKFAC`` and kronfluence's ``kfac``/``ekfac`` strategies:

- Pearson and Spearman of the ``(50, 1000)`` pairwise scores against ``Exact("fisher")`` (the
  empirical Fisher) and ``Exact("ggn")`` (= the true Fisher for cross-entropy), same ``λ``, and
  the mean over queries of the per-query Pearson (``q-Pearson``);
- top-10 overlap with the exact scores (mean over queries of |top10 ∩ top10_exact| / 10);
- fit time and score time (same run, same machine, same threads; ours: median of 3 fits);
- Pearson agreement between ours and kronfluence's.

Then, where installed, curvlinops' type-2 K-FAC/EK-FAC and pyDVL's (see ``_peers.py``), and
CG on the GGN stopped after 1-5 iterations, plain and preconditioned by ``EKFAC("expected")``.

Conventions matched: kronfluence's ``damping_factor`` is absolute (its heuristic applies only
when it is ``None``); its scores are ``g_queryᵀ (F + λI)⁻¹ g_train`` with the summed training
loss, positive = helpful, the same sign and scale as ours; all its dtypes are set to float64.
kronfluence, curvlinops and pyDVL are benchmark-only dependencies, installed apart from the
project, e.g. ``pip install --target /tmp/peers --no-deps kronfluence opt_einsum einconv
curvlinops-for-pytorch`` (plus their missing dependencies); without them their rows are left out.

Run: ``PYTHONPATH=$PWD:/tmp/peers python benchmarks/compare_kronfluence.py [--damping 0.01]``
(writes ``benchmarks/results/compare_kronfluence.{json,md}``; ``--out`` for another name).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch import nn

from _peers import curvlinops_rows, pydvl_rows
from influence import CG, EKFAC, KFAC, ClassificationTask, Exact, InfluenceEstimator, per_sample_grads

DT = torch.float64
PCG_BUDGETS = (1, 2, 3, 5)  # CG iterations after the EK-FAC fit (and plain CG for comparison)


# ----------------------------------------------------------------------------------- problems
def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    ).to(DT)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16 * 9, 4)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def make_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return CNN().to(DT)


def make_data(kind: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        teacher = torch.randn(16, 4, generator=g, dtype=DT)
        x = torch.randn(n, 16, generator=g, dtype=DT)
        logits = 2 * torch.tanh(x @ teacher)
    else:
        patterns = torch.randn(4, 1, 10, 10, generator=g, dtype=DT)
        x = torch.randn(n, 1, 10, 10, generator=g, dtype=DT)
        logits = 0.15 * (x.flatten(1) @ patterns.flatten(1).T)
    y = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    return x, y


def train(model: nn.Module, x, y, steps: int, lr: float) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------------- metrics
def metrics(scores: torch.Tensor, reference: torch.Tensor) -> dict:
    """Pearson/Spearman of all scores, mean per-query Pearson (row by row) and top-10 overlap."""
    a, b = scores.flatten().numpy(), reference.flatten().numpy()
    k = 10
    top = scores.topk(k, dim=1).indices
    ref = reference.topk(k, dim=1).indices
    overlap = np.mean([len(set(t.tolist()) & set(r.tolist())) / k for t, r in zip(top, ref)])
    per_query = np.mean([pearsonr(s.numpy(), r.numpy())[0] for s, r in zip(scores, reference)])
    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0]),
            "query_pearson": float(per_query), "top10": float(overlap)}


# ----------------------------------------------------------------------------------- methods
def exact_scores(model, train_loader, query, curvature_type, damping=None):
    """Exact influence; ``damping=None`` picks ``0.1 · tr(C)/P`` from the fitted matrix."""
    task = ClassificationTask()
    start = time.perf_counter()
    cur = Exact(damping=damping or 1.0, curvature_type=curvature_type, chunk_size=512).fit(model, task, train_loader)
    fit = time.perf_counter() - start
    if damping is None:
        damping = 0.1 * float(torch.diagonal(cur.matrix_).mean())
    start = time.perf_counter()
    Gq = per_sample_grads(model, task, query, objective="measurement")
    Gt = torch.cat([per_sample_grads(model, task, b) for b in train_loader])
    scores = cur.solve(Gq, damping=damping) @ Gt.T
    return cur, scores, fit, time.perf_counter() - start, damping


def dense_ggn(model: nn.Module, x: torch.Tensor, chunk: int = 100) -> torch.Tensor:
    """``(1/N) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i`` with per-example Jacobians (torch.func).

    The same matrix as ``Exact("ggn").matrix_`` (checked on a subset, see ``ggn_check``), built
    from explicit Jacobians because Exact's column-by-column products through vmapped convolutions
    are slow on CPU.
    """
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    P = sum(v.numel() for v in params.values())

    def logits(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    M = torch.zeros(P, P, dtype=DT)
    for start in range(0, len(x), chunk):
        xc = x[start : start + chunk]
        J = vmap(jacrev(logits), in_dims=(None, 0))(params, xc)
        J = torch.cat([J[k].reshape(len(xc), J[k].shape[1], -1) for k in params], dim=-1)
        with torch.no_grad():
            p = torch.softmax(model(xc), dim=-1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        M += J.reshape(-1, P).T @ (H @ J).reshape(-1, P)
    return M / len(x)


def ggn_scores(model, train_loader, query, damping):
    task = ClassificationTask()
    start = time.perf_counter()
    M = dense_ggn(model, torch.cat([b[0] for b in train_loader]))
    L = torch.linalg.cholesky(M + damping * torch.eye(M.shape[0], dtype=DT))
    fit = time.perf_counter() - start
    start = time.perf_counter()
    Gq = per_sample_grads(model, task, query, objective="measurement")
    Gt = torch.cat([per_sample_grads(model, task, b) for b in train_loader])
    scores = torch.cholesky_solve(Gq.T, L).T @ Gt.T
    return scores, fit, time.perf_counter() - start


def ggn_check(model, train_loader, n: int = 20) -> float:
    """Max relative difference between :func:`dense_ggn` and ``Exact("ggn")`` on n examples."""
    x, y = train_loader[0][0][:n], train_loader[0][1][:n]
    exact = Exact(curvature_type="ggn", chunk_size=512).fit(model, ClassificationTask(), [(x, y)]).matrix_
    return float((dense_ggn(model, x) - exact).abs().max() / exact.abs().max())


def ours(model, train_loader, query, cls, fisher_type, damping, repeats=3):
    """Scores and the median fit time over ``repeats`` fits (they take tens of milliseconds)."""
    fits = []
    for _ in range(repeats):
        est = InfluenceEstimator(cls(damping=damping, fisher_type=fisher_type, seed=0), ClassificationTask(), score_dtype=DT)
        start = time.perf_counter()
        est.fit(model, train_loader)
        fits.append(time.perf_counter() - start)
    start = time.perf_counter()
    scores = est.pairwise_scores([query], train_loader)
    return scores, float(np.median(fits)), time.perf_counter() - start


def kronfluence_scores(model, x, y, query, strategy, fisher_type, damping, batch_size, workdir):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class KTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    labels = torch.multinomial(probs, 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    torch.manual_seed(0)
    kmodel = prepare_model(copy.deepcopy(model), KTask())
    analyzer = Analyzer(analysis_name=f"{strategy}_{fisher_type}", model=kmodel, task=KTask(), cpu=True,
                        disable_tqdm=True, output_dir=str(workdir))
    factor_args = FactorArguments(
        strategy=strategy, use_empirical_fisher=fisher_type == "empirical",
        activation_covariance_dtype=DT, gradient_covariance_dtype=DT, eigendecomposition_dtype=DT,
        lambda_dtype=DT, per_sample_gradient_dtype=DT,
    )
    score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=DT, precondition_dtype=DT, score_dtype=DT)
    train_set = torch.utils.data.TensorDataset(x, y)
    query_set = torch.utils.data.TensorDataset(*query)
    start = time.perf_counter()
    analyzer.fit_all_factors("factors", train_set, per_device_batch_size=batch_size, factor_args=factor_args, overwrite_output_dir=True)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    analyzer.compute_pairwise_scores("scores", "factors", query_set, train_set, per_device_query_batch_size=len(query[0]),
                                     per_device_train_batch_size=batch_size, score_args=score_args, overwrite_output_dir=True)
    score = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores("scores")["all_modules"].to(DT)
    return scores, fit, score


# ----------------------------------------------------------------------------------- driver
def pcg(model, train_loader, query, damping, max_iter, preconditioned):
    """CG on the GGN stopped after ``max_iter`` iterations, plain or preconditioned by EK-FAC
    (``fisher_type="expected"``, fitted in the CG's fit): exact influence at K-FAC-like cost."""
    pre = EKFAC(fisher_type="expected") if preconditioned else None
    cur = CG(damping=damping, rtol=0.0, max_iter=max_iter, preconditioner=pre)
    est = InfluenceEstimator(cur, ClassificationTask(), score_dtype=DT)
    start = time.perf_counter()
    est.fit(model, train_loader)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    scores = est.pairwise_scores([query], train_loader)
    return scores, fit, time.perf_counter() - start


def run_problem(kind, n_train, n_query, fisher_types, batch_size, seed, workdir, damping=None, with_kronfluence=True):
    build = make_mlp if kind == "mlp" else make_cnn
    x, y = make_data(kind, n_train + n_query, seed)
    xt, yt, query = x[:n_train], y[:n_train], (x[n_train:], y[n_train:])
    model = train(build(seed), xt, yt, steps=50, lr=1e-2)
    loader = batches(xt, yt, batch_size)
    P = sum(p.numel() for p in model.parameters())
    result = {"problem": kind, "num_params": P, "n_train": n_train, "n_query": n_query,
              "train_accuracy": float((model(xt).argmax(-1) == yt).double().mean()), "rows": []}
    refs, times = {}, {}

    def add(method, library, fisher_type, scores, fit, score, agreement=None):
        row = {"method": method, "library": library, "fisher_type": fisher_type, "fit_s": fit, "score_s": score,
               "agreement_pearson": (agreement or {}).get("pearson"), "agreement_spearman": (agreement or {}).get("spearman")}
        for r, ref in refs.items():
            row.update({f"{r}_{m}": v for m, v in metrics(scores, ref).items()})
        result["rows"].append(row)

    # λ = 0.1 · mean eigenvalue of the exact empirical Fisher unless given; absolute, used by every method.
    _, refs["fisher"], fit, score, damping = exact_scores(model, loader, query, "fisher", damping)
    times["fisher"] = (fit, score)
    refs["ggn"], *times["ggn"] = ggn_scores(model, loader, query, damping)
    result["ggn_check_max_rel_diff"] = ggn_check(model, loader)
    result["damping"] = damping
    for ctype, scores in list(refs.items()):
        add("Exact(fisher)" if ctype == "fisher" else "GGN (dense JᵀHJ)", "influence", "-", scores, *times[ctype])
    for fisher_type in fisher_types:
        for ours_cls, strategy in ((KFAC, "kfac"), (EKFAC, "ekfac")):
            ours_scores, fit, score = ours(model, loader, query, ours_cls, fisher_type, damping)
            # kronfluence has no exact expectation over the classes: our rows only
            if with_kronfluence and fisher_type != "expected":
                k_scores, k_fit, k_score = kronfluence_scores(model, xt, yt, query, strategy, fisher_type, damping, batch_size, workdir)
                agreement = metrics(ours_scores, k_scores)
                add(strategy.upper(), "influence", fisher_type, ours_scores, fit, score, agreement)
                add(strategy, "kronfluence", fisher_type, k_scores, k_fit, k_score, agreement)
            else:
                add(strategy.upper(), "influence", fisher_type, ours_scores, fit, score)
    # other libraries' K-FAC/EK-FAC where installed, on our gradients (same queries, same λ)
    task = ClassificationTask()
    Gq = per_sample_grads(model, task, query, objective="measurement")
    Gt = torch.cat([per_sample_grads(model, task, b) for b in loader])
    for method, library, fisher_type, X, fit, score in curvlinops_rows(model, loader, Gq, damping) + pydvl_rows(model, loader, Gq, damping):
        add(method, library, fisher_type, X @ Gt.T, fit, score)
    for preconditioned in (False, True):
        for max_iter in PCG_BUDGETS:
            scores, fit, score = pcg(model, loader, query, damping, max_iter, preconditioned)
            method = f"CG{'+EKFAC' if preconditioned else ''}, {max_iter} iterations"
            add(method, "influence", "expected" if preconditioned else "-", scores, fit, score)
    return result


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# KFAC/EKFAC: influence vs kronfluence", "",
             f"torch {meta['torch']}, kronfluence {meta['kronfluence']}, {meta['threads']} threads, {meta['machine']}. "
             f"Scores ({meta['n_query']} queries × {meta['n_train']} training examples) compared with exact influence at the same absolute damping "
             "(`Exact('fisher')` = empirical Fisher; GGN = true Fisher for cross-entropy, the dense `JᵀHJ` equal to `Exact('ggn')`, "
             "max relative difference on a 20-example check in the heading). "
             "`q-Pearson` = mean over queries of the Pearson correlation of a query's scores over the training set. "
             "`agree` = Pearson between ours and kronfluence's scores for the same strategy and Fisher type. "
             "Fisher `expected` = the exact expectation over the classes (the GGN's factors; ours only, kronfluence has none). "
             "Our fit times: median of 3 fits.", ""]
    for res in results:
        lines += [f"## {res['problem']} ({res['num_params']} parameters, λ = {res['damping']:.3g}, train accuracy "
                  f"{res['train_accuracy']:.2f}, GGN check {res['ggn_check_max_rel_diff']:.1e})", "",
                  "| method | library | Fisher | Pearson vs F | Spearman vs F | top-10 vs F | Pearson vs GGN | q-Pearson vs GGN | Spearman vs GGN | top-10 vs GGN | agree | fit s | score s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            def f(key, fmt="{:.4f}"):
                v = r.get(key)
                return "–" if v is None else fmt.format(v)
            lines.append(f"| {r['method']} | {r['library']} | {r['fisher_type']} | {f('fisher_pearson')} | {f('fisher_spearman')} | "
                         f"{f('fisher_top10', '{:.2f}')} | {f('ggn_pearson')} | {f('ggn_query_pearson')} | {f('ggn_spearman')} | {f('ggn_top10', '{:.2f}')} | "
                         f"{f('agreement_pearson')} | {f('fit_s', '{:.3f}')} | {f('score_s', '{:.2f}')} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-query", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--fisher-types", nargs="+", default=["empirical", "true", "expected"])
    parser.add_argument("--damping", type=float, default=None,
                        help="absolute damping for every method (default: 0.1 x mean eigenvalue of the empirical Fisher)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare_kronfluence"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        import kronfluence
    except ImportError:  # our rows only
        kronfluence = None
        print("kronfluence is not installed: reporting our rows only")

    meta = {"torch": torch.__version__, "kronfluence": getattr(kronfluence, "__version__", "?") if kronfluence else "not installed",
            "threads": torch.get_num_threads(), "n_query": args.n_query, "n_train": args.n_train, "machine": platform.processor() or platform.machine()}
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for kind in args.problems:
            results.append(run_problem(kind, args.n_train, args.n_query, args.fisher_types, args.batch_size, args.seed,
                                       Path(workdir), args.damping, kronfluence is not None))
            print(markdown(results[-1:], meta))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "args": vars(args), "results": results}, indent=2))
    Path(f"{out}.md").write_text(markdown(results, meta))


if __name__ == "__main__":
    main()
