"""DataInf against its formula evaluated by a naive loop; residuals against exact operators."""

from __future__ import annotations

import warnings

import pytest
import torch

import zoo
from oracles import loop_grads
from influence import CG, Arnoldi, ClassificationTask, CurvatureError, DataInf, Exact, LiSSA


@pytest.fixture(scope="module")
def problem():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=10)
    task = ClassificationTask()
    loader = zoo.batches(x, y, 4)
    G = torch.randn(3, 51, generator=torch.Generator().manual_seed(2), dtype=zoo.DT)
    return model, task, loader, G


def naive_datainf(model, task, loader, G, blocks, damping):
    """Kwon et al. eq. (5): per block, (1/(nλ)) Σ_i (v − (g_iᵀv)/(λ + ‖g_i‖²) g_i), one
    example and one query at a time."""
    train = torch.cat([loop_grads(model, task.loss, b) for b in loader])
    out = torch.zeros_like(G)
    n = train.shape[0]
    for sl in blocks:
        lam = damping if damping != "datainf" else 0.1 * torch.stack(
            [(train[i, sl] ** 2).mean() for i in range(n)]
        ).mean()
        for q in range(G.shape[0]):
            v = G[q, sl]
            acc = torch.zeros_like(v)
            for i in range(n):
                g = train[i, sl]
                acc += (v - (g @ v) / (lam + g @ g) * g) / (n * lam)
            out[q, sl] = acc
    return out


@pytest.mark.parametrize("blocks", ["module", "parameter"])
@pytest.mark.parametrize("damping", ["datainf", 0.05])
def test_datainf_equals_naive_formula(problem, blocks, damping):
    model, task, loader, G = problem
    cur = DataInf(damping=damping, blocks=blocks).fit(model, task, loader)
    table = cur.layout_.module_blocks() if blocks == "module" else cur.layout_.slices()
    assert len(cur.slices_) == (2 if blocks == "module" else 4)
    expected = naive_datainf(model, task, loader, G, list(table.values()), damping)
    torch.testing.assert_close(cur.solve(G), expected, rtol=1e-10, atol=1e-12)


def test_datainf_damping_rule_values(problem):
    model, task, loader, _ = problem
    cur = DataInf().fit(model, task, loader)
    train = torch.cat([loop_grads(model, task.loss, b) for b in loader])
    for sl in cur.slices_:
        torch.testing.assert_close(cur.datainf_damping_[sl], 0.1 * (train[:, sl] ** 2).mean().expand(sl.stop - sl.start))


def test_datainf_zero_damping_raises(problem):
    model, task, loader, G = problem
    cur = DataInf(damping=0.0).fit(model, task, loader)
    with pytest.raises(CurvatureError, match="DataInf divides by the damping, but block"):
        cur.solve(G)
    with pytest.raises(ValueError, match="invalid blocks 'layer'"):
        DataInf(blocks="layer").fit(model, task, loader)


def test_datainf_residual_uses_the_exact_fisher(problem):
    """residual = ‖(F + λI) x − g‖/‖g‖ with the dense empirical Fisher F, not DataInf's own
    matrix (for which solve(matmat) is exact)."""
    model, task, loader, G = problem
    cur = DataInf(damping=0.05).fit(model, task, loader)
    fisher = Exact(damping=0.05, curvature_type="fisher").fit(model, task, loader)
    X = cur.solve(G)
    expected = (fisher.matmat(X) - G).norm(dim=1) / G.norm(dim=1)
    torch.testing.assert_close(cur.residual(G), expected)
    assert float(expected.min()) > 1e-3  # an approximation: visibly non-zero
    torch.testing.assert_close(cur.exact_matmat(X), fisher.matmat(X))


def test_datainf_residual_with_layerwise_damping(problem):
    model, task, loader, G = problem
    cur = DataInf().fit(model, task, loader)
    fisher = Exact(damping=0.0, curvature_type="fisher").fit(model, task, loader)
    X = cur.solve(G)
    expected = fisher.matmat(X) + cur.datainf_damping_ * X
    torch.testing.assert_close(cur.exact_matmat(X), expected)


def test_arnoldi_and_lissa_residuals_use_the_exact_operator(problem):
    model, task, loader, G = problem
    exact = Exact(damping=0.1, curvature_type="ggn").fit(model, task, loader)
    for cur in (
        Arnoldi(damping=0.1, rank=3, curvature_type="ggn").fit(model, task, loader),
        LiSSA(damping=0.1, depth=3, curvature_type="ggn").fit(model, task, loader),
        CG(damping=0.1, max_iter=2, curvature_type="ggn").fit(model, task, loader),
    ):
        with warnings.catch_warnings():  # CG at max_iter=2 warns; that is tested elsewhere
            warnings.simplefilter("ignore")
            X = cur.solve(G)
            expected = (exact.matmat(X) - G).norm(dim=1) / G.norm(dim=1)
            torch.testing.assert_close(cur.residual(G), expected)
        assert float(expected.min()) > 1e-4



def test_stored_gradients_keep_no_graph(problem):
    model, task, loader, G = problem
    cur = DataInf(damping=0.05).fit(model, task, loader, params=["2.*"])
    assert not cur.train_grads_.requires_grad
    assert not cur.solve(G[:, :21]).requires_grad
