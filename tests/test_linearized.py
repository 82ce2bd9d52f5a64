"""Cached per-batch linearisations (curvature/_linearized.py): the same products as the dense
oracles, without reading the data or the model again; dense matrices built the cheap way."""

from __future__ import annotations

import pytest
import torch

import oracles
import zoo
from influence import Arnoldi, ClassificationTask, Exact, LiSSA, select_parameters
from influence.curvature import _linearized, _operator
from influence.curvature._base import check_finite_statistics
from influence.curvature._operator import CurvatureOperator
from influence.curvature.arnoldi import lanczos
from influence.exceptions import NonFiniteGradientError

ORACLES = {"hessian": oracles.dense_hessian, "ggn": oracles.dense_ggn, "fisher": oracles.dense_fisher}
KINDS = {"hessian": _linearized.HessianGraph, "ggn": _linearized.OutputJacobian, "fisher": _linearized.GradientRows}


class CountingLoader(list):
    """A list of batches that counts how often it is iterated."""

    iterations = 0

    def __iter__(self):
        self.iterations += 1
        return super().__iter__()


def problem(n=10, batch_size=4, d_out=3):
    model = zoo.mlp(d_out=d_out)
    x, y = zoo.classification_data(n=n, classes=d_out)
    return model, ClassificationTask(), CountingLoader(zoo.batches(x, y, batch_size))


def plain_product_calls(monkeypatch) -> list:
    calls: list = []
    original = _operator.batch_matmat
    monkeypatch.setattr(_operator, "batch_matmat", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def rows(n, P, seed=0):
    return torch.randn(n, P, generator=torch.Generator().manual_seed(seed), dtype=zoo.DT)


@pytest.mark.parametrize("curvature_type", ["hessian", "ggn", "fisher"])
def test_cached_products_equal_the_dense_oracle_and_read_the_data_once(monkeypatch, curvature_type):
    model, task, loader = problem()
    layout = select_parameters(model)
    dense = ORACLES[curvature_type](model, task, loader)
    op = CurvatureOperator(curvature_type, model, task, layout, loader)
    calls = plain_product_calls(monkeypatch)
    V = rows(3, layout.num_params)
    passes = loader.iterations
    first, second = op.matmat(V), op.matmat(V)
    assert loader.iterations == passes + 1  # the second product reads no data
    assert calls == []  # and never runs the model: every batch's linearisation was cached
    assert len(op._entries) == len(loader) and all(isinstance(e, KINDS[curvature_type]) for e in op._entries.values())
    torch.testing.assert_close(first, V @ dense, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("cache_bytes", [0, 1])
def test_without_the_memory_for_it_nothing_is_cached_and_products_are_the_same(monkeypatch, cache_bytes):
    model, task, loader = problem()
    layout = select_parameters(model)
    V = rows(2, layout.num_params)
    cached = CurvatureOperator("ggn", model, task, layout, loader).matmat(V)
    op = CurvatureOperator("ggn", model, task, layout, loader, cache_bytes=cache_bytes)
    calls = plain_product_calls(monkeypatch)
    out = op.matmat(V)
    assert op._entries == {} and op._caching is False and len(calls) == len(loader)
    torch.testing.assert_close(out, cached, rtol=1e-10, atol=1e-12)


class CoupledTask(ClassificationTask):
    """An output loss that couples the examples of a batch (against the Task protocol): the
    per-example output-Hessian blocks are then not the whole output Hessian."""

    def output_loss(self, outputs, targets, batch):
        return super().output_loss(outputs, targets, batch) + 0.1 * outputs.sum() ** 2


def test_a_linearisation_that_disagrees_with_the_products_is_not_used(monkeypatch):
    model, _, loader = problem()
    task = CoupledTask()
    layout = select_parameters(model)
    V = rows(2, layout.num_params)
    reference = CurvatureOperator("ggn", model, task, layout, loader, cache_bytes=0).matmat(V)
    op = CurvatureOperator("ggn", model, task, layout, loader)
    calls = plain_product_calls(monkeypatch)
    torch.testing.assert_close(op.matmat(V), reference, rtol=1e-12, atol=1e-12)
    assert op._linearizer.enabled is False and op._entries == {} and len(calls) == len(loader)
    # the block-diagonal linearisation really is wrong here, so the check is what saved it
    entry = _linearized.linearize("ggn", model, task, layout, loader[0])
    assert not _linearized.agrees(entry, "ggn", model, task, layout, loader[0])


@pytest.mark.parametrize("jacobian", [True, False], ids=["jacobian", "products"])
def test_exact_ggn_by_either_route_equals_the_oracle(monkeypatch, jacobian):
    monkeypatch.setattr(_linearized, "jacobian_pays_off", lambda *args: jacobian)
    model, task, loader = problem(d_out=5)
    exact = Exact(damping=0.1).fit(model, task, loader)
    torch.testing.assert_close(exact.matrix_, oracles.dense_ggn(model, task, loader), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_exact_hessian_in_column_blocks_equals_the_oracle(chunk_size):
    model, task, loader = problem()
    exact = Exact(damping=0.5, curvature_type="hessian", chunk_size=chunk_size).fit(model, task, loader)
    torch.testing.assert_close(exact.matrix_, oracles.dense_hessian(model, task, loader), rtol=1e-10, atol=1e-12)


def test_the_ggn_jacobian_is_kept_where_its_products_are_cheaper():
    """Small Jacobians always; large ones where the model reuses its weights (convolutions),
    not for a wide MLP with 5 outputs (its kept-Jacobian products cost 4·5·P flops per example
    against ~6·P for the plain ones)."""
    from torch import nn

    task = ClassificationTask()
    wide = nn.Sequential(nn.Linear(100, 256), nn.Tanh(), nn.Linear(256, 5))
    x, y = torch.randn(16, 100), torch.randint(0, 5, (16,))
    assert not _linearized.jacobian_pays_off(wide, task, select_parameters(wide), (x, y), 5)
    assert _linearized.jacobian_pays_off(wide, task, select_parameters(wide), (x[:4], y[:4]), 5)  # 543k entries
    conv = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3))
    images, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    assert _linearized.jacobian_pays_off(conv, task, select_parameters(conv), (images, labels), 3)
    assert _linearized.linearize("ggn", wide, task, select_parameters(wide), (x, y)) is None


def test_arnoldi_takes_the_dense_route_for_large_krylov_spaces_and_lanczos_otherwise():
    model, task, loader = problem()  # P = 51
    P = 51
    oracle = oracles.dense_ggn(model, task, loader)
    values = torch.linalg.eigvalsh(oracle)
    top = values[values.abs().argsort(descending=True)]
    dense = Arnoldi(damping=0.1, rank=5, num_iters=13).fit(model, task, loader)  # 4·13 >= 51
    assert dense.dense_
    torch.testing.assert_close(dense.eigenvalues_, top[:5], rtol=1e-9, atol=1e-12)
    U = dense.eigenvectors_
    torch.testing.assert_close(U.T @ oracle @ U, torch.diag(top[:5]), rtol=1e-9, atol=1e-11)
    krylov = Arnoldi(damping=0.1, rank=5, num_iters=12, seed=3).fit(model, task, loader)  # 48 < 51
    assert not krylov.dense_
    ritz, _ = lanczos(lambda V: V @ oracle, P, 12, seed=3)  # the same Krylov process on the oracle
    torch.testing.assert_close(krylov.eigenvalues_, ritz[:5], rtol=1e-8, atol=1e-10)


def test_lanczos_at_full_dimension_is_the_eigendecomposition():
    A = rows(9, 9)
    A = A @ A.T
    values, vectors = lanczos(lambda V: V @ A, 9, 9)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(A).flip(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, A, rtol=1e-9, atol=1e-9)


def test_lissa_minibatch_products_use_and_fill_the_cache(monkeypatch):
    model, task, loader = problem()
    G = rows(2, 51, seed=1)
    lissa = LiSSA(damping=0.1, depth=60, scale=5.0, tol=float("inf")).fit(model, task, loader)
    calls = plain_product_calls(monkeypatch)
    X = lissa.solve(G)
    assert calls == [] and len(lissa.operator_._entries) == len(loader)
    op = lissa.operator_  # the same recursion through the plain products
    op._entries.clear()
    op._caching = False
    torch.testing.assert_close(lissa.solve(G), X, rtol=1e-10, atol=1e-12)
    assert len(calls) == 60


def test_non_finite_check_passes_finite_values_whose_sum_overflows():
    model, task, loader = problem()
    layout = select_parameters(model)
    check_finite_statistics(torch.tensor([1e308, 1e308], dtype=zoo.DT), model, task, loader[0], layout, 0)
    with pytest.raises(NonFiniteGradientError, match="NaN or inf curvature statistics"):
        check_finite_statistics(torch.tensor([1.0, float("nan")], dtype=zoo.DT), model, task, loader[0], layout, 0)
