"""CG, LiSSA and Arnoldi against ``Exact`` on convex and non-convex float64 problems."""

from __future__ import annotations

import warnings

import pytest
import torch

import zoo
from influence import (
    CG,
    Arnoldi,
    ClassificationTask,
    ConvergenceWarning,
    CurvatureError,
    Exact,
    LiSSA,
)

WD = 0.05  # L2 weight of the logistic regression = the damping


def rel(a, b):
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


@pytest.fixture(scope="module")
def logreg():
    """L2-regularised 3-class logistic regression on 40 points, trained to convergence."""
    torch.manual_seed(0)
    x, y = zoo.classification_data(n=40, d_in=3, classes=3, seed=4)
    model = torch.nn.Linear(3, 3).to(zoo.DT)
    task = ClassificationTask()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = task.loss(model, (x, y)).mean()
        loss = loss + 0.5 * WD * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    assert max(p.grad.abs().max() for p in model.parameters()) < 1e-8
    model.eval()
    full, mini = [(x, y)], zoo.batches(x, y, 10)
    exact = Exact(damping=WD).fit(model, task, mini)
    G = torch.randn(4, 12, generator=torch.Generator().manual_seed(1), dtype=zoo.DT)
    return model, task, full, mini, exact, G


def test_cg_matches_exact(logreg):
    model, task, _, mini, exact, G = logreg
    cg = CG(damping=WD, rtol=1e-12, max_iter=100).fit(model, task, mini)
    assert rel(cg.solve(G), exact.solve(G)) < 1e-6
    info = cg.last_info_
    assert info.converged.all() and (info.iterations <= 12 + 3).all()
    assert (info.residuals < 1e-12).all() and info.num_matmats == int(info.iterations.max())
    assert float(cg.residual(G).max()) < 1e-10


@pytest.mark.parametrize("preconditioner", ["diagonal", "exact"])
def test_cg_preconditioners(logreg, preconditioner):
    model, task, _, mini, exact, G = logreg
    pre = exact if preconditioner == "exact" else "diagonal"
    cg = CG(damping=WD, rtol=1e-12, preconditioner=pre).fit(model, task, mini)
    assert rel(cg.solve(G), exact.solve(G)) < 1e-6
    if preconditioner == "exact":  # the exact inverse: one iteration
        assert cg.preconditioner_ is exact and (cg.last_info_.iterations == 1).all()


def test_cg_max_iter_warns(logreg):
    model, task, _, mini, _, G = logreg
    cg = CG(damping=WD, max_iter=2).fit(model, task, mini)
    with pytest.warns(ConvergenceWarning, match=r"CG reached max_iter=2 with 4 of 4 rows not converged"):
        cg.solve(G)
    assert not cg.last_info_.converged.any() and (cg.last_info_.iterations == 2).all()


def test_cg_ggn_on_mlp_matches_exact_ggn():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=12)
    loader, task = [(x, y)], ClassificationTask()
    exact = Exact(damping=1e-2, curvature_type="ggn").fit(model, task, loader)
    cg = CG(damping=1e-2, curvature_type="ggn", rtol=1e-12, max_iter=200).fit(model, task, loader)
    G = torch.randn(2, exact.num_params_, dtype=zoo.DT)
    assert rel(cg.solve(G), exact.solve(G)) < 1e-6


def test_cg_negative_curvature_raises():
    model = zoo.mlp(seed=1)
    x, y = zoo.classification_data(n=12)
    loader, task = [(x, y)], ClassificationTask()
    hessian = Exact(damping=0, curvature_type="hessian").fit(model, task, loader).matrix_
    smallest = float(torch.linalg.eigvalsh(hessian)[0])
    assert smallest < -1e-3  # the untrained MLP's Hessian is indefinite
    cg = CG(damping=1e-6, curvature_type="hessian", rtol=1e-12, max_iter=500).fit(model, task, loader)
    G = torch.randn(3, cg.num_params_, dtype=zoo.DT)
    with pytest.raises(CurvatureError, match=r"Negative curvature: pᵀAp = .* Use curvature_type='ggn'"):
        cg.solve(G)


def test_the_default_curvature_is_the_ggn_so_non_convex_models_solve():
    """The Hessian default made CG fail on this MLP (above); the GGN default is PSD."""
    import oracles

    model = zoo.mlp(seed=1)
    x, y = zoo.classification_data(n=12)
    loader, task = [(x, y)], ClassificationTask()
    for cls in (CG, LiSSA, Arnoldi, Exact):
        assert cls().curvature_type == "ggn"
    exact = Exact(damping=1e-2).fit(model, task, loader)
    torch.testing.assert_close(exact.matrix_, oracles.dense_ggn(model, task, loader), rtol=1e-10, atol=1e-12)
    cg = CG(damping=1e-2, rtol=1e-12, max_iter=500).fit(model, task, loader)
    G = torch.randn(3, cg.num_params_, generator=torch.Generator().manual_seed(0), dtype=zoo.DT)
    assert rel(cg.solve(G), exact.solve(G)) < 1e-8


def test_cg_bad_arguments(logreg):
    model, task, _, mini, _, _ = logreg
    with pytest.raises(ValueError, match="rtol must be a finite float >= 0"):
        CG(rtol=-1).fit(model, task, mini)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        CG(max_iter=0).fit(model, task, mini)
    with pytest.raises(ValueError, match="Invalid preconditioner 'jacobi'"):
        CG(preconditioner="jacobi").fit(model, task, mini)
    with pytest.raises(TypeError, match=r"write Exact\(...\) with parentheses"):
        CG(preconditioner=Exact).fit(model, task, mini)
    with pytest.raises(ValueError, match="Invalid curvature_type 'ggn2'"):
        CG(curvature_type="ggn2").fit(model, task, mini)


def test_lissa_matches_exact_full_batch(logreg):
    model, task, full, _, exact, G = logreg
    lissa = LiSSA(damping=WD, depth=150).fit(model, task, full)
    assert rel(lissa.solve(G), exact.solve(G)) < 1e-2
    assert lissa.last_info_["scale"] == pytest.approx(2 * lissa.top_eigenvalue_ + WD)
    assert float(lissa.residual(G).max()) < 1e-2


@pytest.mark.filterwarnings("ignore:LiSSA has not converged")  # depth 40: deliberately short
def test_lissa_minibatch_repeats_reduce_error(logreg):
    model, task, _, mini, exact, G = logreg
    one = LiSSA(damping=WD, depth=40, num_repeats=1, averaging="none").fit(model, task, mini)
    many = LiSSA(damping=WD, depth=40, num_repeats=4, averaging="none").fit(model, task, mini)
    target = exact.solve(G)
    X_one, X_many = one.solve(G), many.solve(G)
    assert rel(X_many, target) < 0.15
    assert rel(X_many, target) <= rel(X_one, target)
    torch.testing.assert_close(one.solve(G), X_one, rtol=0, atol=0)  # seeded


def test_lissa_diverges_with_small_scale(logreg):
    model, task, full, _, _, G = logreg
    lissa = LiSSA(damping=WD, depth=200, scale=0.01).fit(model, task, full)
    with pytest.raises(CurvatureError, match=r"LiSSA diverged at step \d+ .* use a larger scale"):
        lissa.solve(G)


def test_lissa_bad_arguments(logreg):
    model, task, full, _, _, _ = logreg
    with pytest.raises(ValueError, match="scale must be a float > 0 or 'auto'"):
        LiSSA(scale=0).fit(model, task, full)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        LiSSA(depth=0).fit(model, task, full)
    with pytest.raises(ValueError, match="Invalid variant 'kohliang'"):
        LiSSA(variant="kohliang").fit(model, task, full)
    with pytest.raises(ValueError, match="damping='datainf' .* only defined for variant='paper'"):
        LiSSA(damping="datainf").fit(model, task, full)
    with pytest.raises(ValueError, match="damping must be a float >= 0 or 'datainf'"):
        LiSSA(damping="auto").fit(model, task, full)


@pytest.mark.filterwarnings("ignore:LiSSA has not converged")  # 3 iterations, as the study ran
def test_lissa_paper_variant_matches_the_study_recursion(logreg):
    """Naive re-implementation of the study's LiSSA loop (3 iterations, step ``/ 1000``)."""
    model, task, full, _, _, G = logreg
    lissa = LiSSA(damping="datainf", variant="paper").fit(model, task, full)
    x, y = full[0]
    names = [n for n, _ in model.named_parameters()]
    per_example = []
    for i in range(len(x)):
        model.zero_grad()
        task.loss(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        per_example.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    layout = lissa.layout_
    query = layout.unflatten(G)
    for row in range(G.shape[0]):
        parts = []
        for name in names:
            v = query[name][row]
            lam = torch.stack([(g[name] ** 2).mean() for g in per_example]).mean() / 10
            running = v
            for _ in range(3):
                tmp = torch.zeros_like(v)
                for g in per_example:
                    tmp += ((g[name] * running).sum() * g[name] - lam * running) / len(per_example)
                running = v + running - tmp / 1000
            parts.append(running.reshape(-1))
        torch.testing.assert_close(lissa.solve(G[row : row + 1])[0], torch.cat(parts))


def test_arnoldi_full_rank_equals_exact_and_error_falls_with_rank(logreg):
    model, task, _, mini, exact, G = logreg
    target = exact.solve(G)
    errors = []
    for rank in (1, 3, 6, 9, 12):
        arn = Arnoldi(damping=WD, rank=rank, num_iters=12).fit(model, task, mini)
        errors.append(rel(arn.solve(G), target))
    assert errors[-1] < 1e-6
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert float(arn.residual(G).max()) < 1e-8


def test_arnoldi_project_and_zero_off_subspace(logreg):
    model, task, _, mini, exact, G = logreg
    arn = Arnoldi(damping=WD, rank=4, off_subspace="zero").fit(model, task, mini)
    Z = arn.project(G)
    assert Z.shape == (4, 4)
    torch.testing.assert_close(Z @ Z.T, G @ arn.solve(G).T)
    # the residual is measured against the exact operator, not the rank-4 approximation
    assert float(arn.residual(G).min()) > 1e-3
    U = arn.eigenvectors_  # solve inverts matmat on the subspace and projects the rest away
    torch.testing.assert_close(arn.solve(arn.matmat(G)), G @ U @ U.T)


def test_arnoldi_errors(logreg):
    model, task, _, mini, _, G = logreg
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        Arnoldi(rank=0).fit(model, task, mini)
    with pytest.raises(ValueError, match=r"num_iters must be an integer in \[rank=4, 12\]"):
        Arnoldi(rank=4, num_iters=2).fit(model, task, mini)
    with pytest.raises(ValueError, match="Invalid off_subspace 'none'"):
        Arnoldi(off_subspace="none").fit(model, task, mini)
    arn = Arnoldi(damping=WD, rank=2).fit(model, task, mini)
    with pytest.raises(CurvatureError, match="divides by the damping off the subspace"):
        arn.solve(G, damping=0.0)
    mlp = zoo.mlp(seed=1)
    x, y = zoo.classification_data(n=12)
    indefinite = Arnoldi(damping=1e-6, rank=51, num_iters=51, curvature_type="hessian").fit(mlp, task, [(x, y)])
    with pytest.raises(CurvatureError, match=r"indefinite curvature\). Use curvature_type='ggn'"):
        indefinite.solve(torch.randn(1, 51, dtype=zoo.DT))


def test_estimator_with_cg_and_datainf(logreg):
    from influence import DataInf, InfluenceEstimator

    model, task, _, mini, exact, _ = logreg
    scores = {}
    for name, cur in (("cg", CG(damping=WD, rtol=1e-12)), ("exact", Exact(damping=WD)),
                      ("datainf", DataInf())):
        est = InfluenceEstimator(cur, task, score_dtype=torch.float64).fit(model, mini)
        scores[name] = est.pairwise_scores(mini[:1])
    assert scores["cg"].shape == (10, 40)
    torch.testing.assert_close(scores["cg"], scores["exact"], rtol=1e-6, atol=1e-9)
    assert torch.isfinite(scores["datainf"]).all()


def test_lissa_zero_curvature_without_damping_raises():
    model = torch.nn.Linear(2, 2).to(zoo.DT)
    loader = [(torch.zeros(4, 2, dtype=zoo.DT), torch.tensor([0, 1, 0, 1]))]
    lissa = LiSSA(damping=0.0, curvature_type="fisher", depth=2, power_iters=2)
    lissa.fit(model, ClassificationTask(), loader, params=["weight"])  # zero input: C = 0
    assert lissa.top_eigenvalue_ == 0.0
    with pytest.raises(CurvatureError, match="found a zero curvature and damping is 0"):
        lissa.solve(torch.ones(1, 4, dtype=zoo.DT))
    with pytest.raises(ValueError, match="power_iters must be a positive integer"):
        LiSSA(power_iters=0).fit(model, ClassificationTask(), loader)


def test_project_and_exact_matmat_need_fit():
    from influence import NotFittedError

    with pytest.raises(NotFittedError, match=r"call fit\(...\) before project\(\)"):
        Arnoldi().project(torch.ones(1, 3))
    with pytest.raises(NotFittedError, match=r"before exact_matmat\(\)"):
        CG().exact_matmat(torch.ones(1, 3))


def test_lissa_auto_scale_retries_when_a_minibatch_diverges():
    import influence

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    xs = [0.1 * torch.randn(8, 3, dtype=torch.float64) for _ in range(4)] + [3 * torch.randn(8, 3, dtype=torch.float64)]
    loader = [(x, torch.randn(8, dtype=torch.float64)) for x in xs]
    task = influence.RegressionTask()
    lissa = influence.LiSSA(damping=1.0, curvature_type="hessian", depth=400, num_repeats=4).fit(model, task, loader)
    exact = influence.Exact(damping=1.0, curvature_type="hessian").fit(model, task, loader)
    G = torch.randn(2, 3, dtype=torch.float64)
    first_scale = lissa.scale_for(1.0)
    with pytest.warns(influence.ConvergenceWarning, match="diverged at scale=.*retrying with scale="):
        X = lissa.solve(G)
    assert lissa.last_info_["scale"] > first_scale
    torch.testing.assert_close(X, exact.solve(G), rtol=0.1, atol=0.05)
