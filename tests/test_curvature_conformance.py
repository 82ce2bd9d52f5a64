"""Generic tests every curvature in ``influence.curvature.CURVATURES`` must pass.

Each class is built as ``cls(damping=DAMPING, **cls.conformance_params)`` and fitted on a tiny
convex problem (float64 softmax regression, two batches); ``solve(matmat(V)) ≈ V`` is checked
to the class's declared ``conformance_rtol``.
"""

from __future__ import annotations

import pytest
import torch

import zoo
from influence import ClassificationTask, NotFittedError, clone
from influence.curvature import CURVATURES

DAMPING = 0.1
IDS = [cls.__name__ for cls in CURVATURES]


def make(cls, **overrides):
    return cls(**{"damping": DAMPING, **cls.conformance_params, **overrides})


def problem(d_in=4, classes=3, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(d_in, classes).to(zoo.DT).eval()
    x, y = zoo.classification_data(n=12, d_in=d_in, classes=classes, seed=seed)
    return model, ClassificationTask(), zoo.batches(x, y, 6)


@pytest.fixture(scope="module")
def fitted():
    model, task, loader = problem()
    return {cls: make(cls).fit(model, task, loader) for cls in CURVATURES}


def rows(n=3, P=15, dtype=zoo.DT, seed=1):
    return torch.randn(n, P, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel(a, b):
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_fit_returns_self(cls):
    model, task, loader = problem()
    cur = make(cls)
    assert cur.fit(model, task, loader) is cur
    assert cur.num_params_ == 15


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_not_fitted(cls):
    cur = make(cls)
    for method in (cur.solve, cur.matmat, cur.residual):
        with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
            method(rows())


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_solve_inverts_matmat(cls, fitted):
    cur = fitted[cls]
    V = rows()
    assert rel(cur.solve(cur.matmat(V)), V) <= cls.conformance_rtol


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_shape_dtype_device_preserved(cls, fitted):
    cur = fitted[cls]
    for dtype in (torch.float32, torch.float64):
        G = rows(n=2, dtype=dtype)
        for out in (cur.solve(G), cur.matmat(G)):
            assert out.shape == G.shape and out.dtype == dtype and out.device == G.device
    assert cur.residual(rows(n=2)).shape == (2,)


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_large_damping_is_scaled_identity(cls, fitted):
    cur = fitted[cls]
    G = rows()
    assert rel(cur.solve(G, damping=1e8) * 1e8, G) < 1e-5


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_clone_and_get_params_round_trip(cls, fitted):
    cur = fitted[cls]
    twin = clone(cur)
    assert type(twin) is cls
    assert repr(twin.get_params()) == repr(cur.get_params())
    with pytest.raises(NotFittedError):
        twin.solve(rows())
    assert make(cls).set_params(**cur.get_params(deep=False)).get_params() == cur.get_params()


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_fit_discards_previous_fit(cls):
    model, task, loader = problem()
    cur = make(cls).fit(model, task, loader)
    cur.solve(rows())
    cur.stale_ = "from the previous fit"
    small, task, small_loader = problem(d_in=3, classes=2, seed=2)
    cur.fit(small, task, small_loader)
    assert not hasattr(cur, "stale_")
    assert cur.num_params_ == 8
    assert cur.solve(rows(P=8)).shape == (3, 8)


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_bad_shapes_raise(cls, fitted):
    cur = fitted[cls]
    with pytest.raises(ValueError, match=r"must be 2-D \(n, 15\), batch first"):
        cur.solve(rows()[0])
    with pytest.raises(ValueError, match=r"must have shape \(n, 15\)"):
        cur.matmat(rows(P=14))
    with pytest.raises(TypeError, match="floating-point"):
        cur.solve(torch.ones(2, 15, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cur.solve([[0.0] * 15])


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_bad_damping_raises(cls, fitted):
    with pytest.raises(ValueError, match="damping must be a finite float >= 0"):
        fitted[cls].solve(rows(), damping=-1.0)


@pytest.mark.parametrize("cls", CURVATURES, ids=IDS)
def test_residual_of_consistent_solvers(cls, fitted):
    """The residual is measured against the true operator, so it is small only where the
    solve is accurate; it is always finite and non-negative."""
    res = fitted[cls].residual(rows())
    assert torch.isfinite(res).all() and (res >= 0).all()
