"""KFAC, EKFAC and Diagonal against the dense Fisher; coverage, fallbacks, statistics, errors."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import zoo
from oracles import dense_fisher
from influence import (
    CURVATURES,
    EKFAC,
    KFAC,
    ClassificationTask,
    CurvatureError,
    Diagonal,
    FallbackWarning,
    InfluenceError,
    LanguageModelingTask,
    NotFittedError,
    Task,
)

DT = torch.float64


def quiet_fit(cur, model, task, loader, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        return cur.fit(model, task, loader, **kw)


def dense(cur):
    P = cur.layout_.num_params
    return cur.matmat(torch.eye(P, dtype=DT), damping=0.0)


def problems():
    x, y = zoo.classification_data(n=6)
    xi, yi = zoo.image_data(n=4)
    lm = zoo.lm_batch(n=3, T=5)
    return {
        "mlp": (zoo.mlp(hidden=(5, 4)), ClassificationTask(), zoo.batches(x, y, 4)),
        "cnn": (zoo.cnn(), ClassificationTask(), zoo.batches(xi, yi, 2)),
        "lm": (zoo.tiny_lm(n_layers=1, d_model=4, d_ff=6, vocab=7), LanguageModelingTask(), zoo.dict_batches(zoo.lm_batch(n=3, T=5, vocab=7), 2)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "lm"])
def test_ekfac_is_closer_to_the_dense_fisher_than_kfac(name):
    model, task, loader = problems()[name]
    F = dense_fisher(model, task, loader)
    K = dense(quiet_fit(KFAC(fisher_type="empirical"), model, task, loader))
    E = dense(quiet_fit(EKFAC(fisher_type="empirical"), model, task, loader))
    torch.testing.assert_close(E, E.T)
    assert (E - F).norm() <= (K - F).norm() + 1e-12
    assert (E - F).norm() < (K - F).norm()  # strictly, on these non-degenerate problems


def test_kfac_equals_dense_fisher_for_one_example_and_one_linear_layer():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    x, y = zoo.classification_data(n=1, d_in=3, classes=2)
    F = dense_fisher(model, ClassificationTask(), [(x, y)])
    cur = KFAC(fisher_type="empirical").fit(model, ClassificationTask(), [(x, y)])
    torch.testing.assert_close(dense(cur), F)


def test_kfac_equals_dense_fisher_when_a_is_rank_one():
    # The same input for every example (A = aaᵀ of rank one): K-FAC is exact, one batch or many.
    torch.manual_seed(0)
    model = nn.Linear(3, 4).to(DT)
    x = torch.randn(1, 3, dtype=DT).expand(5, 3).clone()
    y = torch.tensor([0, 1, 2, 3, 1])
    loader = zoo.batches(x, y, 1)
    F = dense_fisher(model, ClassificationTask(), loader)
    for cls in (KFAC, EKFAC):
        torch.testing.assert_close(dense(cls(fisher_type="empirical").fit(model, ClassificationTask(), loader)), F)


def test_diagonal_equals_the_dense_fisher_diagonal():
    model, task, loader = problems()["cnn"]
    F = dense_fisher(model, task, loader)
    cur = Diagonal(fisher_type="empirical").fit(model, task, loader)
    torch.testing.assert_close(cur.diagonal_, torch.diagonal(F))
    torch.testing.assert_close(dense(cur), torch.diag(torch.diagonal(F)))


@pytest.mark.parametrize("cls", [KFAC, EKFAC, Diagonal])
@pytest.mark.parametrize("name", ["cnn", "lm"])
def test_solve_inverts_matmat(cls, name):
    model, task, loader = problems()[name]
    cur = quiet_fit(cls(damping=1e-2), model, task, loader)
    V = torch.randn(3, cur.layout_.num_params, dtype=DT)
    torch.testing.assert_close(cur.solve(cur.matmat(V)), V)
    torch.testing.assert_close(cur.solve(V, damping=0.5), torch.linalg.solve(dense(cur) + 0.5 * torch.eye(V.shape[1], dtype=DT), V.T).T)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lm"])
def test_coverage_lists_every_parameter_exactly_once(name):
    model, task, loader = problems()[name]
    cur = quiet_fit(EKFAC(), model, task, loader)
    listed = [p for entry in cur.coverage_.values() for p in entry["parameters"]]
    assert sorted(listed) == sorted(cur.layout_.names)
    assert sum(e["num_params"] for e in cur.coverage_.values()) == cur.layout_.num_params
    covered = [n for b in cur.blocks_ for n in b.names]
    assert sorted(covered) == sorted(cur.layout_.names)


def test_fallback_warns_once_and_follows_patterns():
    model, task, loader = problems()["lm"]
    with pytest.warns(FallbackWarning, match=r"blocks\.0\.ln1 \(LayerNorm, 8 params\) -> diagonal") as record:
        cur = KFAC(fallback={"ln_f": "identity"}).fit(model, task, loader)
    assert len([w for w in record if w.category is FallbackWarning]) == 1
    assert cur.coverage_["ln_f"]["method"] == "identity"
    assert cur.coverage_["blocks.0.ln1"]["method"] == "diagonal"
    assert cur.coverage_["blocks.0.attn.q"]["method"] == "kronecker"
    assert cur.coverage_["tok"] == {"method": "kronecker", "parameters": ("tok.weight",), "num_params": 28}
    # Identity blocks contribute C = 0: (0 + λ) on their coordinates.
    V = torch.randn(2, cur.layout_.num_params, dtype=DT)
    idx = [i for b in cur.blocks_ if b.method == "identity" for i in b.index.tolist()]
    torch.testing.assert_close(cur.matmat(V, damping=0.3)[:, idx], 0.3 * V[:, idx])


def test_layer_with_frozen_bias_falls_back_without_dropping_the_weight():
    model = zoo.mlp()
    model[2].bias.requires_grad_(False)
    x, y = zoo.classification_data(n=4)
    with pytest.warns(FallbackWarning, match="2 .Linear, 18 params. -> diagonal"):
        cur = KFAC().fit(model, ClassificationTask(), [(x, y)])
    assert cur.coverage_["2"] == {"method": "diagonal", "parameters": ("2.weight",), "num_params": 18}
    assert "2.bias" not in cur.layout_.names


def test_merge_statistics_equals_a_fit_on_the_union():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=8)
    task = ClassificationTask()
    whole = KFAC(fisher_type="empirical").fit(model, task, [(x, y)])
    part = KFAC(fisher_type="empirical").fit(model, task, [(x[:3], y[:3])])
    rest = KFAC(fisher_type="empirical").fit(model, task, [(x[3:], y[3:])])
    part.merge_statistics(rest.statistics_)
    V = torch.randn(2, whole.layout_.num_params, dtype=DT)
    torch.testing.assert_close(part.solve(V), whole.solve(V))


def test_registered_and_default_constructible():
    for cls in (Diagonal, KFAC, EKFAC):
        assert cls in CURVATURES
        model, task, loader = problems()["lm"]
        cur = quiet_fit(cls(), model, task, loader)
        assert cur.num_examples_ == 3


class _PlainTask(Task):
    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def test_errors():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=4)
    task = ClassificationTask()
    with pytest.raises(ValueError, match=r"invalid fisher_type 'exact'. Supported: \('true', 'empirical', 'expected'\)"):
        KFAC(fisher_type="exact").fit(model, task, [(x, y)])
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1; got 0"):
        Diagonal(num_samples=0).fit(model, task, [(x, y)])
    with pytest.raises(InfluenceError, match="needs an OutputTask.*_PlainTask is not one"):
        EKFAC(fisher_type="true").fit(model, _PlainTask(), [(x, y)])
    EKFAC(fisher_type="empirical").fit(model, _PlainTask(), [(x, y)])  # empirical works
    lm, lm_task, lm_loader = problems()["lm"]
    with pytest.raises(ValueError, match="invalid fallback method 'dense' for pattern 'ln_f'"):
        KFAC(fallback={"ln_f": "dense"}).fit(lm, lm_task, lm_loader)
    with pytest.raises(TypeError, match="fallback must be one of"):
        KFAC(fallback=3).fit(lm, lm_task, lm_loader)
    with pytest.raises(NotFittedError, match="call fit"):
        KFAC().solve(torch.zeros(1, 3))
    with pytest.raises(InfluenceError, match="call fit.*before merge_statistics"):
        KFAC().merge_statistics({})
    cur = KFAC(fisher_type="empirical").fit(model, task, [(x[:1], y[:1])])
    with pytest.raises(ValueError, match="keys differ"):
        cur.merge_statistics({"0/A": torch.zeros(5, 5)})
    with pytest.raises(CurvatureError, match=r"damping=0 is singular: its smallest eigenvalue is 0.*Use damping > \d"):
        cur.solve(torch.zeros(1, cur.layout_.num_params, dtype=DT), damping=0.0)
    model.train()
    bn = zoo.cnn().train()
    xi, yi = zoo.image_data(n=2)
    with pytest.raises(InfluenceError, match="training mode.*model.eval"):
        KFAC().fit(bn, task, [(xi, yi)])


@pytest.mark.parametrize("cls", [KFAC, Diagonal])
def test_non_finite_statistics_name_the_examples(cls):
    from influence import NonFiniteGradientError

    model = zoo.mlp()
    x, y = zoo.classification_data(n=6)
    x[4, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"at indices \[4\]"):
        cls(fisher_type="empirical").fit(model, ClassificationTask(), zoo.batches(x, y, 3))


class _Tokens(nn.Module):
    """A Linear over (B, T, d) inputs whose loss sums over tokens: K-FAC's token convention."""

    def __init__(self, d_in, d_out, bias):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.fc(x).sum(1)



@settings(max_examples=8, deadline=None)
@given(d_in=st.integers(1, 3), d_out=st.integers(2, 3), T=st.integers(1, 3), bias=st.booleans(),
       n=st.integers(1, 4), batch=st.integers(1, 4), seed=st.integers(0, 99))
def test_kfac_shapes_tokens_and_batching(d_in, d_out, T, bias, n, batch, seed):
    torch.manual_seed(seed)
    model = _Tokens(d_in, d_out, bias).to(DT).eval()
    x = torch.randn(n, T, d_in, dtype=DT)
    y = torch.randint(0, d_out, (n,))
    cur = EKFAC(fisher_type="empirical", damping=0.1).fit(model, ClassificationTask(), zoo.batches(x, y, batch))
    a = torch.cat([x, torch.ones(n, T, 1, dtype=DT)], -1) if bias else x
    A = torch.einsum("bti,btj->ij", a, a) / (n * T)
    torch.testing.assert_close(cur.statistics_["fc/A"] / cur.statistics_["fc/A_count"], A)
    V = torch.randn(2, cur.layout_.num_params, dtype=DT)
    torch.testing.assert_close(cur.solve(cur.matmat(V)), V)
    F = dense_fisher(model, ClassificationTask(), [(x, y)])
    E, K = dense(cur), dense(KFAC(fisher_type="empirical").fit(model, ClassificationTask(), [(x, y)]))
    assert (E - F).norm() <= (K - F).norm() + 1e-10
    if n == 1 and T == 1:
        torch.testing.assert_close(K, F)


def test_estimator_scores_with_ekfac_equal_manual_preconditioning():
    from influence import InfluenceEstimator, per_sample_grads

    model, task, loader = problems()["cnn"]
    with pytest.warns(FallbackWarning):
        est = InfluenceEstimator(EKFAC(damping=0.1), task, score_dtype=DT).fit(model, loader)
    scores = est.pairwise_scores(loader[:1])
    Gq = per_sample_grads(model, task, loader[0], objective="measurement")
    Gt = torch.cat([per_sample_grads(model, task, b) for b in loader])
    torch.testing.assert_close(scores, est.curvature_.solve(Gq) @ Gt.T)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.emb(input_ids)))


def test_tied_weights_fall_back_to_the_exact_diagonal():
    torch.manual_seed(0)
    model = _Tied().to(DT).eval()
    batch = {"input_ids": torch.randint(0, 5, (3, 4))}
    task = LanguageModelingTask()
    with pytest.warns(FallbackWarning, match=r"emb \(Embedding, weight tied with head \(Linear\): per-example gradients summed on the hook path; no Kronecker block for a tied weight"):
        cur = KFAC(fisher_type="empirical").fit(model, task, [batch])
    assert cur.coverage_ == {"emb": {"method": "diagonal", "parameters": ("emb.weight",), "num_params": 15,
                                     "reason": "weight tied with head (Linear): per-example gradients summed on the hook path; "
                                               "no Kronecker block for a tied weight"}}
    torch.testing.assert_close(cur.blocks_[0].diagonal, torch.diagonal(dense_fisher(model, task, [batch])))
