"""Property tests of the batched CG core ``block_cg`` on plain random matrices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from influence import CurvatureError, block_cg

DT = torch.float64


def spd(P: int, seed: int, condition: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), P, dtype=DT)
    return (Q * eigenvalues) @ Q.T


@settings(max_examples=30, deadline=None)
@given(
    P=st.integers(1, 12),
    n=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    condition=st.floats(1.0, 1e4),
    precondition=st.booleans(),
)
def test_solves_random_spd_systems(P, n, seed, condition, precondition):
    A = spd(P, seed, condition)
    B = torch.randn(n, P, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    B[0] = 0.0  # a zero right-hand side converges immediately to x = 0
    diag = A.diagonal()
    X, info = block_cg(
        lambda V: V @ A, B, rtol=1e-12, max_iter=10 * P,
        precondition=(lambda R: R / diag) if precondition else None,
    )
    expected = torch.linalg.solve(A, B.T).T
    torch.testing.assert_close(X, expected, rtol=1e-6, atol=1e-8)
    assert info.converged.all()
    assert info.iterations[0] == 0 and float(info.residuals[0]) == 0.0
    assert (info.iterations <= 10 * P).all() and (info.residuals <= 1e-12).all()
    assert X.shape == B.shape and X.dtype == DT


@settings(max_examples=20, deadline=None)
@given(P=st.integers(2, 10), seed=st.integers(0, 2**16))
def test_rows_are_independent_of_each_other(P, seed):
    """Each row's solution is the same whether it is solved alone or with others."""
    A = spd(P, seed, 100.0)
    B = torch.randn(3, P, generator=torch.Generator().manual_seed(seed), dtype=DT)
    together, _ = block_cg(lambda V: V @ A, B, rtol=1e-13, max_iter=20 * P)
    alone = torch.cat([block_cg(lambda V: V @ A, B[i : i + 1], rtol=1e-13, max_iter=20 * P)[0] for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-8, atol=1e-10)


def test_exact_in_at_most_P_iterations_and_atol():
    A = spd(6, 0, 10.0)
    B = torch.randn(2, 6, dtype=DT)
    X, info = block_cg(lambda V: V @ A, B, rtol=0.0, atol=1e-10, max_iter=50)
    assert (info.iterations <= 6 + 2).all() and info.converged.all()


def test_max_iter_reports_unconverged_rows():
    A = spd(8, 1, 1e3)
    X, info = block_cg(lambda V: V @ A, torch.randn(2, 8, dtype=DT), rtol=1e-12, max_iter=2)
    assert not info.converged.any() and (info.iterations == 2).all() and info.num_matmats == 2


def test_indefinite_matrix_raises():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    with pytest.raises(CurvatureError, match=r"Negative curvature: pᵀAp = .* not positive definite"):
        block_cg(lambda V: V @ A, torch.tensor([[0.0, 1.0]], dtype=DT))
