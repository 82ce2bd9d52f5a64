import pytest
import torch

import influence
from influence import ClassificationTask, CurvatureError, Exact, Identity, LanguageModelingTask

import oracles
import zoo

ORACLES = {"hessian": oracles.dense_hessian, "ggn": oracles.dense_ggn, "fisher": oracles.dense_fisher}
LM_PARAMS = ["blocks.1.fc2", "lm_head.weight", "ln_f.*"]


@pytest.mark.parametrize("kind", list(ORACLES))
def test_mlp_matrix_equals_oracle(kind):
    model = zoo.mlp(hidden=(4,))
    x, y = zoo.classification_data(n=9)
    loader = zoo.batches(x, y, 4)
    cur = Exact(curvature_type=kind, chunk_size=7).fit(model, ClassificationTask(), loader)
    torch.testing.assert_close(cur.matrix_, ORACLES[kind](model, ClassificationTask(), loader), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", list(ORACLES))
def test_lm_matrix_equals_oracle(kind):
    model = zoo.tiny_lm()
    loader = zoo.dict_batches(zoo.lm_batch(n=4, labels=True), 3)
    task = LanguageModelingTask()
    cur = Exact(curvature_type=kind).fit(model, task, loader, params=LM_PARAMS)
    names = list(cur.layout_.names)
    torch.testing.assert_close(cur.matrix_, ORACLES[kind](model, task, loader, names), atol=1e-12, rtol=0)


def test_solve_matches_dense_solve_and_damping_needs_no_refit():
    model = zoo.mlp(hidden=(3,))
    loader = [zoo.classification_data(n=10)]
    cur = Exact(damping=0.1, curvature_type="ggn").fit(model, ClassificationTask(), loader)
    G = torch.randn(4, cur.num_params_, dtype=torch.float64)
    for lam in (0.1, 1.0):
        A = cur.matrix_ + lam * torch.eye(cur.num_params_, dtype=torch.float64)
        torch.testing.assert_close(cur.solve(G, damping=lam), torch.linalg.solve(A, G.T).T)
        torch.testing.assert_close(cur.matmat(G, damping=lam), G @ A)
    assert float(cur.residual(G).max()) < 1e-12
    assert cur.solve(G.float()).dtype == torch.float32


def test_indefinite_hessian_is_reported():
    model = zoo.mlp(hidden=(6,))
    loader = [zoo.classification_data(n=12)]
    cur = Exact(damping=0.0, curvature_type="hessian").fit(model, ClassificationTask(), loader)
    smallest = float(torch.linalg.eigvalsh(cur.matrix_)[0])
    assert smallest < 0
    with pytest.raises(CurvatureError, match=r"not positive definite.*smallest eigenvalue is -.*curvature_type='ggn'"):
        cur.solve(torch.ones(1, cur.num_params_, dtype=torch.float64))
    cur.solve(torch.ones(1, cur.num_params_, dtype=torch.float64), damping=-smallest + 1e-3)


def test_too_many_parameters_is_refused():
    with pytest.raises(CurvatureError, match=r"over 51 parameters.*max_params=50.*CG, EKFAC"):
        Exact(max_params=50).fit(zoo.mlp(hidden=(6,)), ClassificationTask(), [zoo.classification_data()])
    with pytest.raises(ValueError, match=r"Invalid curvature_type 'gnn'. Supported: \('hessian', 'ggn', 'fisher'\)"):
        Exact(curvature_type="gnn").fit(zoo.mlp(), ClassificationTask(), [zoo.classification_data()])


def test_shape_checks():
    cur = Identity().fit(zoo.mlp(), ClassificationTask(), [zoo.classification_data()])
    P = cur.num_params_
    with pytest.raises(ValueError, match=rf"must be 2-D \(n, {P}\).*Use G\[None\]"):
        cur.solve(torch.zeros(P))
    with pytest.raises(ValueError, match=rf"must have shape \(n, {P}\)"):
        cur.solve(torch.zeros(2, P + 1))
    with pytest.raises(TypeError, match="floating-point"):
        cur.solve(torch.zeros(2, P, dtype=torch.long))
    with pytest.raises(ValueError, match="Identity with damping=0 is singular"):
        cur.solve(torch.zeros(2, P), damping=0.0)
