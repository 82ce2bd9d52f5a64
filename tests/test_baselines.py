"""Baselines against dense oracles on tiny float64 problems."""

import copy

import pytest
import torch

from influence import (
    ClassificationTask,
    GradientSimilarity,
    Identity,
    InfluenceEstimator,
    LanguageModelingTask,
    ModelChangedError,
    NotFittedError,
    RepresentationSimilarity,
    TracIn,
    TRAK,
    clone,
)
from influence.baselines import trak as trak_module
from influence.baselines.trak import RandomProjection
from oracles import loop_grads
from zoo import DT, batches, classification_data, dict_batches, lm_batch, mlp, tiny_lm

TASK = ClassificationTask()


@pytest.fixture
def setup():
    model = mlp(d_in=3, hidden=(4,), d_out=3)
    x, y = classification_data(n=10, d_in=3)
    xq, yq = classification_data(n=4, d_in=3, seed=1)
    return model, batches(x, y, 4), batches(xq, yq, 3), (x, y), (xq, yq)


def oracle_grads(model, data):
    return loop_grads(model, TASK.loss, data)


def unit(G):
    return G / G.norm(dim=1, keepdim=True)


def test_gradient_dot_matches_oracle_and_identity_estimator(setup):
    model, train, test, tr, te = setup
    sim = GradientSimilarity("dot").fit(model, train)
    expected = oracle_grads(model, te) @ oracle_grads(model, tr).T
    torch.testing.assert_close(sim.pairwise_scores(test), expected)
    est = InfluenceEstimator(Identity(), score_dtype=DT).fit(model, train)
    torch.testing.assert_close(sim.pairwise_scores(test), est.pairwise_scores(test))
    torch.testing.assert_close(sim.self_scores(), est.self_scores())
    for a, b in zip(sim.top_k(test, 4), est.top_k(test, 4)):  # the shared streaming top-k
        torch.testing.assert_close(a, b)


def test_gradient_cosine_matches_oracle(setup):
    model, train, test, tr, te = setup
    sim = GradientSimilarity("cosine").fit(model, train)
    expected = unit(oracle_grads(model, te)) @ unit(oracle_grads(model, tr)).T
    torch.testing.assert_close(sim.pairwise_scores(test), expected)
    torch.testing.assert_close(sim.self_scores(), torch.ones(10, dtype=DT))


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_matches_full_scores_and_batching(setup, largest):
    model, train, test, tr, te = setup
    sim = GradientSimilarity("dot").fit(model, train)
    full = sim.pairwise_scores(test)
    values, indices = sim.top_k(test, 3, largest=largest, train_loader=batches(*tr, 7))
    ref_v, ref_i = torch.topk(full, 3, dim=1, largest=largest)
    torch.testing.assert_close(values, ref_v)
    assert torch.equal(indices, ref_i)
    with pytest.raises(ValueError, match="k=11 exceeds the number of training examples"):
        sim.top_k(test, 11)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        sim.top_k(test, 0)


def test_tracin_is_rate_weighted_sum_over_checkpoints(setup):
    model, train, test, tr, te = setup
    early = mlp(d_in=3, hidden=(4,), d_out=3, seed=5)
    rates = [0.5, 0.1]
    expected = sum(
        r * oracle_grads(m, te) @ oracle_grads(m, tr).T for m, r in zip([early, model], rates)
    )
    from_models = TracIn([early, model], rates).fit(model, train)
    from_dicts = TracIn([early.state_dict(), model.state_dict()], rates).fit(model, train)
    torch.testing.assert_close(from_models.pairwise_scores(test), expected)
    torch.testing.assert_close(from_dicts.pairwise_scores(test), expected)
    self_expected = sum(r * (oracle_grads(m, tr) ** 2).sum(1) for m, r in zip([early, model], rates))
    torch.testing.assert_close(from_dicts.self_scores(), self_expected)


def test_tracin_errors(setup):
    model, train, *_ = setup
    with pytest.raises(ValueError, match="learning_rates has 1 values for 2 checkpoints"):
        TracIn([model, model], [0.1]).fit(model, train)
    with pytest.raises(TypeError, match=r"Wrap a single one in a list: checkpoints=\[...\]"):
        TracIn(model.state_dict()).fit(model, train)
    with pytest.raises(ValueError, match="does not fit the model"):
        TracIn([{"weight": torch.zeros(1)}]).fit(model, train)


def test_random_projection_identical_cached_blocked_and_chunked(monkeypatch):
    monkeypatch.setattr(trak_module, "_BLOCK_ROWS", 3)
    G = torch.randn(5, 8, dtype=DT)
    cached = RandomProjection(8, 4, "rademacher", seed=3, max_cached=10**6)
    streamed = RandomProjection(8, 4, "rademacher", seed=3, max_cached=0)
    assert streamed.cached is None
    torch.testing.assert_close(cached(G), streamed(G))
    assert set(cached.cached.abs().unique().tolist()) == {0.5}


def test_trak_matches_dense_formula_and_ensemble(setup):
    model, train, test, tr, te = setup
    other = mlp(d_in=3, hidden=(4,), d_out=3, seed=7)
    lam, k = 0.05, 6
    trak = TRAK(projection_dim=k, damping=lam, models=[model, other], seed=2).fit(model, train)
    expected = 0
    for m, member in enumerate([model, other]):
        P = oracle_grads(member, tr).shape[1]
        R = RandomProjection(P, k, "gaussian", 2 + m, 0)
        Phi, phi = R(oracle_grads(member, tr)), R(oracle_grads(member, te))
        K = Phi.T @ Phi / Phi.shape[0] + lam * torch.eye(k, dtype=DT)
        expected = expected + phi @ torch.linalg.solve(K, Phi.T) / 2
    scores = trak.pairwise_scores(test)
    torch.testing.assert_close(scores, expected)
    # the cached training features equal recomputed ones from an equal loader
    torch.testing.assert_close(trak.pairwise_scores(test, copy.deepcopy(train)), scores)


def test_repsim_hook_matches_manual_cosine(setup):
    model, train, test, tr, te = setup
    repsim = RepresentationSimilarity(layer="1").fit(model, train)
    h = lambda x: torch.tanh(model[0](x)).detach()  # noqa: E731
    torch.testing.assert_close(repsim.pairwise_scores(test), unit(h(te[0])) @ unit(h(tr[0])).T)
    dot = RepresentationSimilarity(layer="1", similarity="dot").fit(model, train)
    torch.testing.assert_close(dot.self_scores(), (h(tr[0]) ** 2).sum(1))


def _manual_pool(H, batch, pooling):
    rows = []
    for i in range(H.shape[0]):
        valid = torch.nonzero(batch["attention_mask"][i]).flatten()
        if pooling == "mean":
            rows.append(H[i, valid].mean(0))
        elif pooling == "last":
            rows.append(H[i, valid[-1]])
        else:
            first = int(torch.nonzero(batch["labels"][i] != -100).flatten()[0])
            rows.append(H[i, first - 1])
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "last", "last_prompt"])
def test_repsim_pooling_on_tiny_lm(pooling):
    model = tiny_lm()
    data = lm_batch(n=6, labels=True)
    loader = dict_batches(data, 4)
    hidden = lambda m, b: m.hidden_states(b["input_ids"], b["attention_mask"])  # noqa: E731
    by_hook = RepresentationSimilarity("ln_f", "dot", pooling, LanguageModelingTask()).fit(model, loader)
    by_call = RepresentationSimilarity(hidden, "dot", pooling).fit(model, loader)
    with torch.no_grad():
        pooled = _manual_pool(hidden(model, data), data, pooling)
    torch.testing.assert_close(by_hook.pairwise_scores(loader), pooled @ pooled.T)
    torch.testing.assert_close(by_call.pairwise_scores(loader), pooled @ pooled.T)


def test_repsim_errors(setup):
    model, train, *_ = setup
    with pytest.raises(ValueError, match="layer 'nope' is not a submodule of Sequential. Available"):
        RepresentationSimilarity("nope").fit(model, train)
    with pytest.raises(ValueError, match="Invalid pooling 'max'. Supported: \\('mean', 'last', 'last_prompt'\\)"):
        RepresentationSimilarity(pooling="max").fit(model, train)
    with pytest.raises(ValueError, match="Invalid similarity 'l2'"):
        RepresentationSimilarity(similarity="l2").fit(model, train)
    lm = tiny_lm()
    plain = dict_batches(lm_batch(n=4), 4)
    repsim = RepresentationSimilarity("ln_f", pooling="last_prompt", task=LanguageModelingTask()).fit(lm, plain)
    with pytest.raises(Exception, match="pooling='last_prompt' needs dict batches with 'labels'"):
        repsim.pairwise_scores(plain)
    no_response = lm_batch(n=2, labels=True)
    no_response["labels"][:] = -100
    with pytest.raises(Exception, match="no prompt .* or no response"):
        repsim.fit(lm, [no_response]).pairwise_scores([no_response])


@pytest.mark.parametrize(
    "method",
    [GradientSimilarity(), RepresentationSimilarity(), TracIn([mlp(d_in=3, hidden=(4,), d_out=3)]), TRAK(projection_dim=3)],
    ids=lambda m: type(m).__name__,
)
def test_estimator_contract(setup, method):
    model, train, test, *_ = setup
    with pytest.raises(NotFittedError, match="call fit"):
        method.pairwise_scores(test)
    fresh = clone(method)
    assert fresh.get_params().keys() == method.get_params().keys()
    assert fresh.fit(model, train) is fresh
    assert fresh.pairwise_scores(test).shape == (4, 10)
    assert fresh.self_scores().shape == (10,)
    changed = copy.deepcopy(model)
    fresh.fit(changed, train)
    with torch.no_grad():
        changed[0].weight.add_(1.0)
    with pytest.raises(ModelChangedError, match="Call fit"):
        fresh.pairwise_scores(test)


def test_non_finite_gradients_are_reported(setup):
    model, train, test, tr, te = setup
    bad = [(tr[0].clone(), tr[1])]
    bad[0][0][2] = float("nan")
    with pytest.raises(Exception, match=r"NaN or inf gradients for 1 train \(indices within the batch\) example\(s\) at indices \[2\]"):
        GradientSimilarity().fit(model, bad).self_scores()


def test_pool_left_padding_no_mask_and_shapes():
    from influence.baselines.representation import pool

    H = torch.arange(2 * 4 * 1, dtype=DT).reshape(2, 4, 1)
    left = {"attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}
    assert pool(H, left, "last")[:, 0].tolist() == [3.0, 7.0]
    assert pool(H, left, "mean")[:, 0].tolist() == [2.5, 5.5]
    assert pool(H, (None,), "mean")[:, 0].tolist() == [1.5, 5.5]  # no mask: every token
    flat = torch.randn(3, 5, dtype=DT)
    assert pool(flat, None, "last") is flat
    with pytest.raises(Exception, match=r"Representations must be \(B, D\) or \(B, T, D\)"):
        pool(torch.zeros(1, 2, 3, 4), None, "mean")
