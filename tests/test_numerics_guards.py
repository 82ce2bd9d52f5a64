"""Silent wrong results of the solvers (issue 13, items 8, 9, 12): a numerically singular
``C + λI`` raises for every direct solve, LiSSA warns when it has not converged (or grows
without bound on a singular system), and the messages give advice that applies."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import zoo
from influence import (
    CG,
    EKFAC,
    KFAC,
    ClassificationTask,
    ConvergenceWarning,
    CurvatureError,
    DataInf,
    Diagonal,
    Exact,
    LiSSA,
    RegressionTask,
)
from influence.curvature._base import RCOND, check_conditioning

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def singular():
    """An MLP with 51 parameters on 8 examples: its Fisher/GGN has rank <= 16 (singular)."""
    model = zoo.mlp(d_in=4, hidden=(6,), d_out=3)
    x, y = zoo.classification_data(n=8, d_in=4, classes=3, seed=1)
    G = torch.randn(3, 51, generator=torch.Generator().manual_seed(2), dtype=zoo.DT)
    return model, [(x, y)], G


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_kronecker_solve_at_damping_zero_on_a_singular_fisher_raises(singular, cls):
    model, loader, G = singular
    cur = cls(damping=0.0, fisher_type="empirical").fit(model, TASK, loader)
    smallest, largest, mean = cur.eigenvalue_summary()
    assert smallest <= RCOND * largest  # the corrected eigenvalues include ~0
    with pytest.raises(CurvatureError, match=rf"{cls.__name__}: C \+ damping·I at damping=0 is (numerically )?singular.*Use damping > .*mean eigenvalue"):
        cur.solve(G)
    X = cur.solve(G, damping=0.1 * mean)  # the suggested damping works and inverts matmat
    torch.testing.assert_close(cur.matmat(X, damping=0.1 * mean), G)


def test_diagonal_with_vanishing_entries_raises():
    """A feature of scale 1e-20 gives Fisher diagonal entries ~1e-40: dividing by them blew a
    gradient up by 1e40 before (the old guard only caught entries <= 0)."""
    model = torch.nn.Linear(3, 2).to(zoo.DT)
    x, y = zoo.classification_data(n=10, d_in=3, classes=2)
    x[:, 2] *= 1e-20
    cur = Diagonal(damping=0.0, fisher_type="empirical").fit(model, TASK, [(x, y)])
    assert 0 < float(cur.diagonal_.min()) < 1e-30
    G = torch.ones(1, 8, dtype=zoo.DT)
    with pytest.raises(CurvatureError, match=r"Diagonal: .*numerically singular: its smallest eigenvalue .* is at most 1e-12 x its largest"):
        cur.solve(G)
    torch.testing.assert_close(cur.solve(G, damping=1e-3), G / (cur.diagonal_ + 1e-3))


def test_exact_singular_ggn_message_does_not_suggest_ggn(singular):
    model, loader, G = singular
    cur = Exact(damping=0.0, curvature_type="ggn").fit(model, TASK, loader)
    for damping in (0.0, 1e-20):
        with pytest.raises(CurvatureError, match=r"Exact\('ggn'\): C \+ damping·I at damping=.* singular.*Use damping > ") as info:
            cur.solve(G, damping=damping)
        assert "curvature_type='ggn'" not in str(info.value)
    smallest, largest, _ = cur.eigenvalue_summary()
    assert smallest < RCOND * largest
    lam = 1e-6 * largest  # well conditioned: matches a float64 dense solve
    A = cur.matrix_ + lam * torch.eye(51, dtype=zoo.DT)
    torch.testing.assert_close(cur.solve(G, damping=lam), torch.linalg.solve(A, G.T).T)


def test_exact_hessian_keeps_the_ggn_advice():
    cur = Exact(damping=0.0, curvature_type="hessian").fit(zoo.mlp(hidden=(6,)), TASK, [zoo.classification_data()])
    with pytest.raises(CurvatureError, match=r"not positive definite: C's smallest eigenvalue is -.*curvature_type='ggn'"):
        cur.solve(torch.ones(1, cur.num_params_, dtype=zoo.DT))


def test_exact_well_conditioned_check_is_exact_at_the_threshold():
    """The cheap Cholesky proof never refuses a damping that passes the eigenvalue test by a
    margin, and a damping just below the threshold is refused."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).to(zoo.DT)
    x = torch.randn(20, 3, dtype=zoo.DT)
    x[:, 2] = 0  # C = xᵀx/N has an exact zero eigenvalue
    cur = Exact(damping=0.0, curvature_type="ggn").fit(model, RegressionTask(), [(x, torch.zeros(20, dtype=zoo.DT))])
    _, largest, _ = cur.eigenvalue_summary()
    cur.solve(torch.ones(1, 3, dtype=zoo.DT), damping=10 * RCOND * largest)
    with pytest.raises(CurvatureError, match="numerically singular"):
        cur.solve(torch.ones(1, 3, dtype=zoo.DT), damping=0.5 * RCOND * largest)


def test_datainf_tiny_damping_raises_per_block(singular):
    model, loader, G = singular
    cur = DataInf(damping=1e-30).fit(model, TASK, loader)
    with pytest.raises(CurvatureError, match=r"DataInf block \[0:30\]: .*numerically singular"):
        cur.solve(G)
    with pytest.raises(CurvatureError, match=r"block \[0:30\] has damping 0\. Use a float damping > 0"):
        cur.solve(G, damping=0.0)
    assert torch.isfinite(cur.solve(G, damping=1e-3)).all()


def test_check_conditioning_messages():
    check_conditioning(1e-3, 1.0, 0.0, "X")  # fine
    with pytest.raises(CurvatureError, match="is zero: there is nothing to invert. Use damping > 0 "):
        check_conditioning(0.0, 0.0, 0.0, "X")
    with pytest.raises(CurvatureError, match=r"is singular: C's smallest eigenvalue is -1e-17, and as the ggn is positive semi-definite"):
        check_conditioning(-1e-17, 1.0, 0.0, "X", "ggn")
    with pytest.raises(CurvatureError, match="non-finite eigenvalues"):
        check_conditioning(float("nan"), 1.0, 0.0, "X")


# ----------------------------------------------------------------------------------- LiSSA
@pytest.fixture(scope="module")
def regression():
    """Linear least squares ``C = xᵀx / N`` whose third feature is always 0 (singular)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=zoo.DT)
    x[:, 2] = 0
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).to(zoo.DT)
    loader = [(x, torch.randn(30, generator=g, dtype=zoo.DT))]
    return model, RegressionTask(), loader, x


def _solve(lissa, G):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X = lissa.solve(G)
    return X, [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_lissa_singular_at_damping_zero_warns(regression):
    """At damping 0 the null-space part of the query grows by one ``g_null`` per step: the
    result is finite garbage that used to come back silently."""
    model, task, loader, x = regression
    lissa = LiSSA(damping=0.0, curvature_type="ggn", depth=100).fit(model, task, loader)
    in_range = torch.tensor([[1.0, -0.5, 0.0]], dtype=zoo.DT)
    off_range = torch.tensor([[1.0, -0.5, 1.0]], dtype=zoo.DT)
    C = x.T @ x / len(x)
    X, caught = _solve(lissa, in_range)
    assert not caught  # the pseudo-inverse solution, converged
    torch.testing.assert_close(X[:, :2], torch.linalg.solve(C[:2, :2], in_range[0, :2])[None])
    X, caught = _solve(lissa, off_range)
    assert float(X[0, 2]) > 100 / lissa.last_info_["scale"]  # (depth + 1) · g_null / scale
    assert len(caught) == 1 and "has not converged" in str(caught[0].message)
    assert "damping=0" in str(caught[0].message) and lissa.last_info_["half_change"][0] > 0.4


# the last: each step is only 1/100 of the iterate (final step 0.01 < tol) yet the error is 1.0
@pytest.mark.parametrize("kw", [dict(scale=1e6, depth=10), dict(depth=5), dict(scale=1e6, depth=100)])
def test_lissa_unconverged_warns(regression, kw):
    model, task, loader, _ = regression
    lissa = LiSSA(damping=0.1, curvature_type="ggn", **kw).fit(model, task, loader)
    G = torch.tensor([[1.0, 2.0, 0.5]], dtype=zoo.DT)
    exact = Exact(damping=0.1, curvature_type="ggn").fit(model, task, loader).solve(G)
    X, caught = _solve(lissa, G)
    assert float((X - exact).norm() / exact.norm()) > 0.4  # far from the solution
    assert len(caught) == 1
    assert re.search(r"LiSSA has not converged: in 1 of 1 rows .* more than tol=0.05", str(caught[0].message))


def test_lissa_converged_does_not_warn_and_reports(regression):
    model, task, loader, _ = regression
    G = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], dtype=zoo.DT)
    lissa = LiSSA(damping=0.3, curvature_type="ggn", depth=150).fit(model, task, loader)
    X, caught = _solve(lissa, G)
    assert not caught
    exact = Exact(damping=0.3, curvature_type="ggn").fit(model, task, loader).solve(G)
    torch.testing.assert_close(X, exact, rtol=1e-5, atol=1e-12)
    info = lissa.last_info_
    assert set(info) == {"scale", "final_step", "half_change", "averaged"} and info["half_change"].shape == (2,)
    assert info["averaged"] is False  # one batch: the last iterate
    assert float(info["half_change"].max()) < 0.05 and float(info["final_step"][1]) == 0.0
    strict = LiSSA(damping=0.3, curvature_type="ggn", depth=150, tol=1e-20).fit(model, task, loader)
    assert len(_solve(strict, G)[1]) == 1  # tol is what decides
    with pytest.raises(ValueError, match=r"tol must be a float > 0 \(float\('inf'\) disables the check\); got 0"):
        LiSSA(tol=0).fit(model, task, loader)


def test_lissa_paper_variant_is_checked_too(regression):
    model, task, loader, _ = regression
    lissa = LiSSA(damping="datainf", variant="paper").fit(model, task, loader)
    X, caught = _solve(lissa, torch.tensor([[1.0, 2.0, 0.5]], dtype=zoo.DT))
    assert len(caught) == 1 and "variant='paper' runs the study's fixed 3 iterations" in str(caught[0].message)
    assert lissa.last_info_["half_change"].shape == (1,)


# ----------------------------------------------------------------------------------- CG
@pytest.mark.parametrize("curvature_type", ["ggn", "fisher", "hessian"])
def test_cg_negative_curvature_advice_fits_the_curvature_type(regression, monkeypatch, curvature_type):
    """A negative ``pᵀAp`` means indefinite for the Hessian but rounding on a singular matrix
    for the PSD types: only the Hessian is told to use curvature_type='ggn'."""
    import influence.curvature.cg as cg_module

    model, task, loader, _ = regression
    cg = CG(damping=0.0, curvature_type=curvature_type).fit(model, task, loader)

    def negative(*args, **kwargs):
        raise CurvatureError("Negative curvature: pᵀAp = -1e-18 <= 0 at CG iteration 3 (row 0).")

    monkeypatch.setattr(cg_module, "block_cg", negative)
    with pytest.raises(CurvatureError, match=rf"CG\('{curvature_type}', damping=0\): Negative curvature") as info:
        cg.solve(torch.ones(1, 3, dtype=zoo.DT))
    if curvature_type == "hessian":
        assert "indefinite" in str(info.value) and "curvature_type='ggn'" in str(info.value)
    else:
        assert "numerically singular" in str(info.value) and "curvature_type='ggn'" not in str(info.value)
