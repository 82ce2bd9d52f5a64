"""fisher_type="expected": the exact expectation over the targets (the GGN's K-FAC/EK-FAC/diagonal
statistics from the square-root columns of the output Hessian) against dense float64 oracles."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import zoo
from oracles import dense_ggn
from test_fisher_draws import BATCHINGS, assert_same_fits, fit_all, split
from test_kfac_factors import naive_layer_io
from influence import (
    EKFAC,
    KFAC,
    ClassificationTask,
    Diagonal,
    FallbackWarning,
    InfluenceError,
    LanguageModelingTask,
    RegressionTask,
    Task,
)

DT = torch.float64


def quiet(cur, model, task, loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        return cur.fit(model, task, loader)


def dense(cur):
    return cur.matmat(torch.eye(cur.layout_.num_params, dtype=DT), damping=0.0)


def problems():
    x, y = zoo.classification_data(n=6)
    xi, yi = zoo.image_data(n=4)
    xr = torch.randn(6, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    yr = torch.randn(6, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    return {
        "mlp": (zoo.mlp(hidden=(5, 4)), ClassificationTask(), zoo.batches(x, y, 4)),
        "cnn": (zoo.cnn(), ClassificationTask(), zoo.batches(xi, yi, 3)),  # BatchNorm: diagonal fallback
        "regression": (zoo.mlp(hidden=(5,), d_out=2), RegressionTask(), zoo.batches(xr, yr, 4)),
    }


def naive_expected_S(model, loader, name):
    """``(1/N) Σ_i Σ_c p_ic Σ_t s_t s_tᵀ``, ``s`` the layer's output gradient of the loss at
    target ``c``: the true Fisher's expectation over the classes, one autograd call per pair."""
    module, task = dict(model.named_modules())[name], ClassificationTask()
    S, n = 0, 0
    for x, _ in loader:
        for i in range(len(x)):
            with torch.no_grad():
                p = torch.softmax(model(x[i : i + 1]), -1)[0]
            for c in range(len(p)):
                _, grads = naive_layer_io(model, task, (x[i : i + 1], torch.tensor([c])), [name])
                s = grads[name][0]
                s = s.reshape(s.shape[0], -1).T if isinstance(module, nn.Conv2d) else s.reshape(-1, s.shape[-1])
                S = S + p[c] * s.T @ s
            n += 1
    return S / n


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_expected_output_factors_equal_the_sum_over_classes(name):
    model, task, loader = problems()[name]
    cur = quiet(KFAC(fisher_type="expected"), model, task, loader)
    assert cur.fisher_plan_ == {"requested": "expected", "computed": "expected", "columns": 3}
    st = cur.statistics_
    for layer in cur._layers:
        S = st[f"{layer}/S"] / st[f"{layer}/S_count"]
        torch.testing.assert_close(S, naive_expected_S(model, loader, layer), rtol=1e-10, atol=1e-12)


def ggn_in_eigenbasis(block, G):
    """``diag((Q_S ⊗ Q_A)ᵀ G_block (Q_S ⊗ Q_A))`` as ``(d_out, d_in')``: the GGN block's exact
    diagonal in the block's Kronecker eigenbasis."""
    P = G.shape[0]
    E = block.to_matrix(torch.eye(P, dtype=DT)).reshape(P, -1)  # flat coordinates -> block's
    Q_A = block.Q_A if block.Q_A is not None else torch.eye(block.eigenvalues.shape[1], dtype=DT)  # Embedding
    Q = torch.kron(block.Q_S, Q_A)
    return torch.diagonal(Q.T @ (E.T @ G @ E) @ Q).reshape(block.eigenvalues.shape)


@pytest.mark.parametrize("name", ["mlp", "cnn", "regression"])
def test_expected_ekfac_and_diagonal_equal_the_dense_ggn(name):
    # EK-FAC's corrections are the GGN's exact diagonal in the eigenbasis, the fallback blocks and
    # Diagonal the GGN's diagonal: no sampling noise, to rounding
    model, task, loader = problems()[name]
    G = dense_ggn(model, task, loader)
    ekfac = quiet(EKFAC(fisher_type="expected"), model, task, loader)
    kron = [b for b in ekfac.blocks_ if b.method == "kronecker"]
    assert len(kron) == 3 if name != "regression" else len(kron) == 2
    for block in kron:
        torch.testing.assert_close(block.eigenvalues, ggn_in_eigenbasis(block, G), rtol=1e-10, atol=1e-13)
    fell_back = [i for b in ekfac.blocks_ if b.method == "diagonal" for i in b.index.tolist()]
    assert bool(fell_back) == (name == "cnn")  # the BatchNorm's parameters
    torch.testing.assert_close(torch.diagonal(dense(ekfac))[fell_back], torch.diagonal(G)[fell_back], rtol=1e-10, atol=1e-13)
    diagonal = Diagonal(fisher_type="expected").fit(model, task, loader)
    torch.testing.assert_close(diagonal.diagonal_, torch.diagonal(G), rtol=1e-10, atol=1e-13)
    assert diagonal.num_examples_ == sum(len(b[0]) for b in loader)


@pytest.mark.parametrize("task", [ClassificationTask(), RegressionTask()])
def test_expected_kfac_equals_the_ggn_of_one_linear_layer_with_rank_one_inputs(task):
    # the same input for every example: A = aaᵀ and the GGN block is exactly S ⊗ A
    torch.manual_seed(0)
    model = nn.Linear(3, 4).to(DT)
    x = torch.randn(1, 3, dtype=DT).expand(5, 3).clone()
    y = torch.tensor([0, 1, 2, 3, 1]) if isinstance(task, ClassificationTask) else torch.randn(5, 4, dtype=DT)
    loader = zoo.batches(x, y, 2)
    G = dense_ggn(model, task, loader)
    for cls in (KFAC, EKFAC):
        torch.testing.assert_close(dense(cls(fisher_type="expected").fit(model, task, loader)), G, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, Diagonal])
def test_expected_fisher_does_not_depend_on_the_batching(cls):
    model = zoo.mlp(d_in=3, hidden=(4,), d_out=3, seed=1)
    model[0].bias.requires_grad_(False)  # K-FAC: layer 0's weight on the diagonal fallback
    x, y = zoo.classification_data(n=16, d_in=3, classes=3, seed=2)
    fits = fit_all(lambda: cls(damping=0.1, fisher_type="expected"), model, ClassificationTask(), [split(x, y, s) for s in BATCHINGS])
    assert_same_fits(fits, [(x[:2], y[:2])])
    # deterministic: no seed enters
    (other_seed,) = fit_all(lambda: cls(damping=0.1, fisher_type="expected", seed=9), model, ClassificationTask(), [split(x, y, [16])])
    for key, value in fits[0].curvature_.statistics_.items():
        torch.testing.assert_close(other_seed.curvature_.statistics_[key], value, rtol=1e-10, atol=1e-13)


def test_expected_falls_back_to_sampling_for_language_models_and_many_classes():
    model = zoo.tiny_lm(n_layers=1, d_model=4, d_ff=6, vocab=7)
    task, loader = LanguageModelingTask(), zoo.dict_batches(zoo.lm_batch(n=3, T=5, vocab=7), 2)
    with warnings.catch_warnings(record=True) as caught:  # also the LayerNorms' coverage warning
        warnings.simplefilter("always")
        expected = EKFAC(fisher_type="expected", num_samples=2, fallback="identity").fit(model, task, loader)
    said = r"EKFAC\(fisher_type='expected'\): LanguageModelingTask has no closed-form square root.*num_samples=2 target"
    assert any(w.category is FallbackWarning and re.search(said, str(w.message)) for w in caught)
    assert expected.fisher_plan_["computed"] == "true" and expected.fisher_plan_["num_samples"] == 2
    sampled = quiet(EKFAC(fisher_type="true", num_samples=2, fallback="identity"), model, task, loader)
    for key, value in sampled.statistics_.items():  # exactly what fisher_type="true" computes
        assert torch.equal(expected.statistics_[key], value), key
    x, y = zoo.classification_data(n=6, classes=3)
    with pytest.warns(FallbackWarning, match=r"3 square-root columns, more than max_classes=2"):
        few = Diagonal(fisher_type="expected", max_classes=2).fit(zoo.mlp(), ClassificationTask(), zoo.batches(x, y, 4))
    assert few.fisher_plan_ == {"requested": "expected", "computed": "true", "num_samples": 1,
                                "reason": "its output Hessian has 3 square-root columns, more than max_classes=2"}
    assert few.num_examples_ == 6


class _ItemSquare(torch.autograd.Function):
    """``x²`` whose backward reads a value with ``.item()``: no vmap rule, so a batched
    backward fails and the columns are back-propagated one at a time."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad * (1.0 if grad.abs().sum().item() >= 0 else 0.0)


class _Net(nn.Module):
    def __init__(self, custom):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.custom = nn.Linear(4, 5), nn.Linear(5, 3), custom

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(_ItemSquare.apply(h) if self.custom else h * h)


def test_expected_back_propagates_column_by_column_where_vmap_fails():
    x, y = zoo.classification_data(n=6)
    loader = zoo.batches(x, y, 4)
    fits = [EKFAC(fisher_type="expected").fit(_Net(custom).to(DT), ClassificationTask(), loader) for custom in (False, True)]
    for key, value in fits[0].statistics_.items():
        torch.testing.assert_close(fits[1].statistics_[key], value, rtol=1e-12, atol=1e-15, msg=key)


def test_expected_errors():
    x, y = zoo.classification_data(n=4)
    model, loader = zoo.mlp(), zoo.batches(x, y, 4)

    class PlainTask(Task):
        def loss(self, model, batch):
            return ClassificationTask().loss(model, batch)

    with pytest.raises(InfluenceError, match=r"KFAC\(fisher_type='expected'\) takes targets from the model's predictive distribution and needs an OutputTask.*PlainTask is not one"):
        KFAC(fisher_type="expected").fit(model, PlainTask(), loader)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"Diagonal: max_classes must be an integer >= 1; got"):
            Diagonal(fisher_type="expected", max_classes=bad).fit(model, ClassificationTask(), loader)
    with pytest.raises(ValueError, match=r"invalid fisher_type 'exact'. Supported: \('true', 'empirical', 'expected'\)"):
        EKFAC(fisher_type="exact").fit(model, ClassificationTask(), loader)
    cur = KFAC(fisher_type="expected").fit(model, ClassificationTask(), loader)
    bad_plan = {"fisher_plan_": {"computed": "expected", "columns": "__import__('os')", "code": 1}}
    with pytest.raises(ValueError, match="the saved fisher_plan_ is malformed"):
        cur._load_state({}, bad_plan, cur.layout_, model)


@pytest.mark.parametrize("batch_first", [True, False])
def test_expected_ekfac_on_a_transformer_layer_equals_the_dense_ggn(batch_first):
    # nn.TransformerEncoderLayer (sequence-first at B == T: the batch axis comes from the layer
    # plan, not from shapes), an Embedding and tokens that interact through attention: EK-FAC's
    # eigenvalues are still the GGN's exact diagonal in each layer's Kronecker eigenbasis
    from test_model_zoo import CLS, Encoder, seeded, seq_data

    model = seeded(Encoder, batch_first)
    (train,), _ = seq_data(6, 6)
    G = dense_ggn(model, CLS, [train])
    ekfac = quiet(EKFAC(fisher_type="expected"), model, CLS, [train])
    kron = [b for b in ekfac.blocks_ if b.method == "kronecker"]
    assert {b.info.name for b in kron} >= {"emb", "layer.linear1", "layer.linear2", "head"}
    for block in kron:
        torch.testing.assert_close(block.eigenvalues, ggn_in_eigenbasis(block, G), rtol=1e-9, atol=1e-13, msg=block.info.name)
