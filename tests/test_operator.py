"""``CurvatureOperator``: matrix-free mean curvature products against dense float64 oracles."""

from __future__ import annotations

import pytest
import torch

import zoo
from oracles import dense_fisher, dense_ggn, dense_hessian
from influence import ClassificationTask, CurvatureOperator, LanguageModelingTask, select_parameters

ORACLES = {"hessian": dense_hessian, "ggn": dense_ggn, "fisher": dense_fisher}
LM_PARAMS = ["blocks.0.attn.q.weight", "blocks.0.attn.q.bias", "blocks.1.fc2.bias", "ln_f.weight"]


def mlp_problem():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=10)
    return model, ClassificationTask(), zoo.batches(x, y, 4), None


def lm_problem():
    model = zoo.tiny_lm()
    loader = zoo.dict_batches(zoo.lm_batch(n=4, T=6, labels=True), 2)
    return model, LanguageModelingTask(), loader, LM_PARAMS


@pytest.mark.parametrize("curvature_type", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("make", [mlp_problem, lm_problem], ids=["mlp", "tiny_lm"])
def test_matmat_equals_dense_oracle(make, curvature_type):
    model, task, loader, names = make()
    layout = select_parameters(model, names or "trainable")
    op = CurvatureOperator(curvature_type, model, task, layout, loader)
    dense = ORACLES[curvature_type](model, task, loader, names)
    V = torch.randn(3, layout.num_params, generator=torch.Generator().manual_seed(0), dtype=zoo.DT)
    out = op.matmat(V)
    assert out.dtype == torch.float64 and out.shape == V.shape
    torch.testing.assert_close(out, V @ dense, rtol=1e-9, atol=1e-11)
    assert op.num_examples == 10 if make is mlp_problem else 4


def test_subsample_is_seeded_and_equals_oracle_on_the_drawn_examples():
    model, task, loader, _ = mlp_problem()
    layout = select_parameters(model)
    op = CurvatureOperator("ggn", model, task, layout, loader, num_samples=5, seed=3)
    again = CurvatureOperator("ggn", model, task, layout, loader, num_samples=5, seed=3)
    assert op.num_examples == 5
    x, y = zoo.classification_data(n=10)
    chosen = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:5].sort().values
    dense = dense_ggn(model, task, [(x[chosen], y[chosen])])
    V = torch.randn(2, layout.num_params, dtype=zoo.DT)
    torch.testing.assert_close(op.matmat(V), V @ dense, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.matmat(V), again.matmat(V), rtol=0, atol=0)


def test_bad_num_samples_raise():
    model, task, loader, _ = mlp_problem()
    layout = select_parameters(model)
    with pytest.raises(ValueError, match="num_samples=11 exceeds the 10 examples"):
        CurvatureOperator("ggn", model, task, layout, loader, num_samples=11)
    from influence import CG

    with pytest.raises(ValueError, match="num_samples must be a positive integer or None"):
        CG(num_samples=0).fit(model, task, loader)


def test_top_eigenvalue_and_fisher_diagonal():
    model, task, loader, _ = mlp_problem()
    layout = select_parameters(model)
    op = CurvatureOperator("fisher", model, task, layout, loader)
    dense = dense_fisher(model, task, loader)
    top = float(torch.linalg.eigvalsh(dense)[-1])
    assert abs(op.top_eigenvalue(num_iters=60) - top) < 1e-3 * top
    torch.testing.assert_close(op.mean_squared_gradients(), dense.diagonal(), rtol=1e-9, atol=1e-12)


def test_non_finite_products_name_the_examples():
    from influence import CG, NonFiniteGradientError

    model, task, loader, _ = mlp_problem()
    x, y = loader[1]
    x = x.clone()
    x[2, 0] = float("nan")  # global example index 4 + 2 = 6
    loader = [loader[0], (x, y)]
    cg = CG(damping=0.1, curvature_type="ggn").fit(model, task, loader)
    with pytest.raises(NonFiniteGradientError, match=r"curvature statistics .* at indices \[6\]"):
        cg.solve(torch.ones(1, cg.num_params_, dtype=zoo.DT))


def test_non_finite_lissa_minibatch_names_the_examples():
    from influence import LiSSA, NonFiniteGradientError

    model, task, loader, _ = mlp_problem()
    x, y = loader[2]
    x = x.clone()
    x[1, 0] = float("inf")  # global example index 8 + 1 = 9
    loader = [loader[0], loader[1], (x, y)]
    lissa = LiSSA(damping=0.1, curvature_type="ggn", depth=30, scale=10.0).fit(model, task, loader)
    with pytest.raises(NonFiniteGradientError, match=r"at indices \[9\]"):
        lissa.solve(torch.ones(1, lissa.num_params_, dtype=zoo.DT))


def test_products_keep_no_autograd_graph_of_unselected_parameters():
    model, task, loader, _ = mlp_problem()
    layout = select_parameters(model, ["2.weight"])  # other parameters still require grad
    op = CurvatureOperator("fisher", model, task, layout, loader)
    dense = dense_fisher(model, task, loader, ["2.weight"])
    V = torch.randn(2, layout.num_params, dtype=zoo.DT)
    out = op.matmat(V)
    assert not out.requires_grad
    torch.testing.assert_close(out, V @ dense, rtol=1e-9, atol=1e-11)
