"""Progress of iterative solvers (issue 17.5): CG, LiSSA, Lanczos/Arnoldi and power iteration
show a bar per solve with the iteration count and the current residual, matching the solver's
own final figures; nothing is printed (and no number changes) when progress is off."""

import re

import pytest
import torch

from influence import CG, Arnoldi, ClassificationTask, InfluenceEstimator, LiSSA, block_cg
from influence._progress import run_options
from influence.curvature.arnoldi import lanczos


def frames(err: str, desc: str) -> list[str]:
    """The drawn states of the bar named ``desc`` (tqdm redraws a line after ``\\r``)."""
    return [f.strip() for f in re.split(r"[\r\n]", err) if f.strip().startswith(desc)]


def final(err: str, desc: str) -> tuple[int, int, dict]:
    """``(count, total, {measure: text})`` of the last drawn state of bar ``desc``."""
    drawn = frames(err, desc)
    assert drawn, f"no {desc!r} bar in {err!r}"
    match = re.search(r"(\d+)/(\d+) \[[^,\]]*(?:, [^,\]]*/s)?(.*)\]$", drawn[-1])
    assert match, drawn[-1]
    measures = dict(re.findall(r"(\w+)=([^,\]\s]+)", match.group(3)))
    return int(match.group(1)), int(match.group(2)), measures


def spd(P=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(P, P, generator=g, dtype=torch.float64)
    return M @ M.T + 0.1 * torch.eye(P, dtype=torch.float64)


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    P = sum(p.numel() for p in model.parameters())
    G = torch.randn(3, P, dtype=torch.float64)
    return model, loader, G


@pytest.mark.parametrize("max_iter", [3, 100])
def test_block_cg_bar_shows_iterations_and_the_final_residual(capsys, max_iter):
    A = spd()
    B = torch.randn(4, 6, dtype=torch.float64)
    with run_options(progress=True):
        X, info = block_cg(lambda V: V @ A, B, rtol=1e-10, max_iter=max_iter)
    count, total, measures = final(capsys.readouterr().err, "CG (4 rows)")
    assert total == max_iter and count == int(info.iterations.max()) == info.num_matmats
    assert measures["residual"] == f"{float(info.residuals.max()):.3g}"
    assert int(measures["active"]) == int((~info.converged).sum())
    if max_iter == 3:  # stopped early: the residual shown is far from converged
        assert float(measures["residual"]) > 1e-3 and int(measures["active"]) > 0
    with run_options(progress=False):
        X_off, info_off = block_cg(lambda V: V @ A, B, rtol=1e-10, max_iter=max_iter)
    assert capsys.readouterr().err == ""
    assert torch.equal(X, X_off) and torch.equal(info.residuals, info_off.residuals)


def test_block_cg_intermediate_residuals_are_the_largest_row_residual(capsys):
    A = spd(8, seed=1)
    B = torch.randn(3, 8, dtype=torch.float64)
    shown = []
    for k in range(1, 5):  # the bar after k iterations equals a solve stopped at max_iter=k
        with run_options(progress=True):
            _, info = block_cg(lambda V: V @ A, B, rtol=1e-12, max_iter=k)
        err = capsys.readouterr().err
        assert final(err, "CG")[2]["residual"] == f"{float(info.residuals.max()):.3g}"
        shown.append(float(info.residuals.max()))
    with run_options(progress=True):
        block_cg(lambda V: V @ A, B, rtol=1e-12, max_iter=4)
    # every drawn state (tqdm may skip redraws) carries one of the per-iteration maxima
    drawn = [dict(re.findall(r"(\w+)=([^,\]\s]+)", f)) for f in frames(capsys.readouterr().err, "CG")]
    assert all(d["residual"] in {f"{r:.3g}" for r in shown} for d in drawn if "residual" in d)


def test_cg_curvature_bar_matches_last_info_and_is_silent_when_off(capsys, problem):
    model, loader, G = problem
    cg = CG(damping=0.1, rtol=1e-8).fit(model, ClassificationTask(), loader)
    with run_options(progress=True):
        X = cg.solve(G)
    count, _, measures = final(capsys.readouterr().err, "CG (3 rows)")
    assert count == int(cg.last_info_.iterations.max())
    assert measures["residual"] == f"{float(cg.last_info_.residuals.max()):.3g}"
    with run_options(progress=False):
        assert torch.equal(cg.solve(G), X)
    assert capsys.readouterr().err == ""
    cg.solve(G)  # the default: bars only when stderr is a terminal (captured here: not one)
    assert capsys.readouterr().err == ""


def test_estimator_progress_reaches_the_cg_solve(capsys, problem):
    model, loader, _ = problem
    est = InfluenceEstimator(CG(damping=0.1), ClassificationTask(), progress=True).fit(model, loader)
    est.pairwise_scores(loader[:1])
    assert frames(capsys.readouterr().err, "CG (8 rows)")
    est.set_params(progress=False)
    est.pairwise_scores(loader[:1])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("num_repeats", [1, 2])
def test_lissa_bar_shows_steps_and_the_final_step_and_half_change(capsys, problem, num_repeats):
    model, loader, G = problem
    with run_options(progress=True):
        lissa = LiSSA(damping=0.1, depth=60, num_repeats=num_repeats, tol=float("inf"))
        lissa.fit(model, ClassificationTask(), loader)
        X = lissa.solve(G)
    err = capsys.readouterr().err
    count, total, measures = final(err, "LiSSA (3 rows)")
    assert count == total == 60 * num_repeats
    info = lissa.last_info_
    assert measures["step"] == f"{float(info['final_step'].max()):.3g}"
    assert measures["half_change"] == f"{float(info['half_change'].max()):.3g}"
    count, total, measures = final(err, "power iteration")  # scale='auto' in fit
    assert count == total == 20 and measures["eigenvalue"] == f"{lissa.top_eigenvalue_:.3g}"
    with run_options(progress=False):
        assert torch.equal(lissa.solve(G), X)
    assert capsys.readouterr().err == ""


def test_lissa_intermediate_step_is_the_reported_iterates_relative_step(capsys, problem):
    """Without averaging and with one repeat, the step shown after t steps is the final step of
    a solve of depth t (the same seeded draws)."""
    model, loader, G = problem
    expected = set()
    for depth in range(1, 8):
        lissa = LiSSA(damping=0.1, depth=depth, averaging="none", scale=5.0, tol=float("inf"))
        lissa.fit(model, ClassificationTask(), loader).solve(G)
        expected.add(f"{float(lissa.last_info_['final_step'].max()):.3g}")
    with run_options(progress=True):
        lissa.solve(G)  # depth 7
    drawn = [dict(re.findall(r"(\w+)=([^,\]\s]+)", f)) for f in frames(capsys.readouterr().err, "LiSSA")]
    steps = [d["step"] for d in drawn if "step" in d]
    assert steps and set(steps) <= expected
    assert steps[-1] == f"{float(lissa.last_info_['final_step'].max()):.3g}"


def test_lanczos_bar_residual_vanishes_on_an_invariant_krylov_space(capsys):
    values = torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    A = Q @ torch.diag(values) @ Q.T  # three distinct eigenvalues: Krylov spaces of dim 3 are invariant
    with run_options(progress=True):
        lanczos(lambda V: V @ A, 10, 3)
        lanczos(lambda V: V @ A, 10, 2)
    err = capsys.readouterr().err
    drawn = [f for f in frames(err, "Lanczos") if "residual=" in f]
    three = [f for f in drawn if "3/3" in f][-1]
    two = [f for f in drawn if "2/2" in f][-1]
    assert float(re.search(r"residual=([^,\]\s]+)", three).group(1)) < 1e-10
    assert float(re.search(r"residual=([^,\]\s]+)", two).group(1)) > 1e-3


def test_arnoldi_bars_lanczos_iterations_and_dense_batches(capsys, problem):
    model, loader, G = problem  # 51 parameters
    with run_options(progress=True):
        lanczos_fit = Arnoldi(damping=0.1, rank=4).fit(model, ClassificationTask(), loader)
        dense_fit = Arnoldi(damping=0.1, rank=20).fit(model, ClassificationTask(), loader)
    err = capsys.readouterr().err
    assert not lanczos_fit.dense_ and dense_fit.dense_
    count, total, measures = final(err, "Lanczos")
    assert count == total == 8 and float(measures["residual"]) >= 0
    assert final(err, "dense curvature")[1] == 3  # a bar over the 3 batches (redrawn at tqdm's rate)
    with run_options(progress=False):
        again = Arnoldi(damping=0.1, rank=4).fit(model, ClassificationTask(), loader)
    assert capsys.readouterr().err == ""
    assert torch.equal(again.eigenvectors_, lanczos_fit.eigenvectors_)
