"""Single-pass scoring: every strategy equals the dense torch.func reference in float64."""

import pytest
import torch
from torch import nn

import zoo
from influence import ClassificationTask, Exact, Identity, InfluenceEstimator, LanguageModelingTask
from influence.curvature._base import Curvature
from influence.gradients.functional import per_sample_grads
from influence.scoring import GHOST_EFFICIENCY, ScoringConfig, truncated_svd


class DiagScale(Curvature):
    """A cheap non-identity preconditioner for tests: ``C = diag(1 + i mod 3)``."""

    def _fit(self, model, task, loader, layout):
        self.diag_ = 1.0 + torch.arange(layout.num_params) % 3

    def _solve(self, G, damping):
        return G / (self.diag_.to(G) + damping)

    def _matmat(self, V, damping):
        return V * (self.diag_.to(V) + damping)


def reference(model, task, curvature, test, train):
    Q = torch.cat([per_sample_grads(model, task, b, objective="measurement") for b in test])
    G = torch.cat([per_sample_grads(model, task, b) for b in train])
    return curvature.solve(Q) @ G.T


def mlp_case():
    model = zoo.mlp(hidden=(7, 6))
    x, y = zoo.classification_data(n=11)
    return model, ClassificationTask(), zoo.batches(x[:4], y[:4], 3), zoo.batches(x, y, 4)


def cnn_case():
    model = zoo.cnn()
    x, y = zoo.image_data(n=7)
    return model, ClassificationTask(), zoo.batches(x[:3], y[:3], 2), zoo.batches(x, y, 3)


def lm_case():
    model = zoo.tiny_lm()
    batch = zoo.lm_batch(n=7, labels=True)
    test = zoo.dict_batches(zoo.lm_batch(n=3, seed=5), 2)
    return model, LanguageModelingTask(), test, zoo.dict_batches(batch, 3)


def gpt2_case():
    """Stock GPT-2 (HF ``Conv1D`` weights stored (d_in, d_out); ``wte`` tied to ``lm_head``)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=13, n_positions=12, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=1, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).double().eval()
    batch = zoo.lm_batch(n=5, labels=True)
    test = zoo.dict_batches(zoo.lm_batch(n=3, seed=5), 2)
    return model, LanguageModelingTask(), test, zoo.dict_batches(batch, 3)


CASES = {"mlp": mlp_case, "cnn": cnn_case, "lm": lm_case, "gpt2": gpt2_case}
CURVATURES = {"identity": lambda: Identity(damping=0.5), "diag": lambda: DiagScale(damping=0.1)}
STRATEGIES = ["auto", "materialise", "factored"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("curv", CURVATURES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_exact(case, curv, strategy):
    model, task, test, train = CASES[case]()
    est = InfluenceEstimator(CURVATURES[curv](), task, score_dtype=torch.float64, scoring=ScoringConfig(strategy=strategy)).fit(model, train)
    ref = reference(model, task, est.curvature_, test, train)
    torch.testing.assert_close(est.pairwise_scores(test), ref, rtol=1e-9, atol=1e-11)
    hook_layers = [n for n, e in est.plan_["layers"].items() if e["kind"] != "layernorm"]
    if strategy != "auto":
        assert all(est.plan_["layers"][n]["mode"] == strategy for n in hook_layers)


def test_exact_curvature_and_func_method_agree():
    model, task, test, train = mlp_case()
    hooks = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), task, score_dtype=torch.float64).fit(model, train)
    func = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), task, score_dtype=torch.float64, gradient_method="func").fit(model, train)
    torch.testing.assert_close(hooks.pairwise_scores(test), func.pairwise_scores(test), rtol=1e-9, atol=1e-11)
    assert not func.gradients_.layers and hooks.gradients_.layers


def test_ghost_is_chosen_for_mlp_identity_and_reported():
    model, task, test, train = mlp_case()
    est = InfluenceEstimator(Identity(), task).fit(model, train)
    est.pairwise_scores(test)
    for entry in est.plan_["layers"].values():
        assert entry["mode"] == "factored" and entry["form"] == "ghost (exact)"
        assert entry["cost_factored"] < entry["cost_materialise"]


def test_low_rank_full_rank_exact_and_truncation_close():
    model, task, test, train = mlp_case()
    ref = None
    for rank in (None, 100, 2):
        cfg = ScoringConfig(strategy="factored", query_rank=rank)
        est = InfluenceEstimator(DiagScale(damping=0.1), task, score_dtype=torch.float64, scoring=cfg).fit(model, train)
        s = est.pairwise_scores(test)
        if ref is None:
            ref = reference(model, task, est.curvature_, test, train)
        if rank != 2:
            torch.testing.assert_close(s, ref, rtol=1e-9, atol=1e-11)
        else:
            assert not torch.allclose(s, ref) and est.plan_["layers"]["0"]["rank"] == 2
            assert torch.corrcoef(torch.stack([s.flatten(), ref.flatten()]))[0, 1] > 0.9


def test_low_rank_auto_uses_cost_model():
    model, task, test, train = lm_case()
    est = InfluenceEstimator(DiagScale(damping=0.1), task, score_dtype=torch.float64, scoring=ScoringConfig(query_rank=1)).fit(model, train)
    est.pairwise_scores(test)
    for entry in est.plan_["layers"].values():
        if entry["kind"] != "layernorm":
            better = "factored" if entry["cost_factored"] < GHOST_EFFICIENCY * entry["cost_materialise"] else "materialise"
            assert entry["mode"] == better


def wide_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 20)).double().eval()
    x, y = torch.randn(40, 30, dtype=torch.float64), torch.randint(0, 20, (40,))
    return model, ClassificationTask(), zoo.batches(x[:6], y[:6], 6), zoo.batches(x, y, 16)


@pytest.mark.parametrize("projection,k,min_corr", [("dense", 4000, 0.99), ("factored", 32, 0.95)])
def test_projection_seeded_and_preserves_inner_products(projection, k, min_corr):
    model, task, test, train = wide_case()

    def scores(seed, dim=k):
        cfg = ScoringConfig(projection=projection, projection_dim=dim, seed=seed)
        return InfluenceEstimator(Identity(), task, score_dtype=torch.float64, scoring=cfg).fit(model, train).pairwise_scores(test)

    exact = InfluenceEstimator(Identity(), task, score_dtype=torch.float64).fit(model, train).pairwise_scores(test)
    a, b, c = scores(1), scores(1), scores(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for s in (a, c):
        assert torch.corrcoef(torch.stack([s.flatten(), exact.flatten()]))[0, 1] > min_corr
    if projection == "factored":  # error shrinks as k grows (JL)
        corr = [torch.corrcoef(torch.stack([scores(1, dim=d).flatten(), exact.flatten()]))[0, 1] for d in (8, 39)]
        assert corr[0] < corr[1]


@pytest.mark.parametrize("case", ["wide", "gpt2"])
@pytest.mark.parametrize("curv", CURVATURES)
def test_factored_projection_exact_when_k_covers_layers(case, curv):
    """With k >= every layer's widths the projections are the identity: exact scores (GPT-2's
    Conv1D weights, stored (d_in, d_out), are projected output side first like the others)."""
    model, task, test, train = wide_case() if case == "wide" else gpt2_case()
    cfg = ScoringConfig(projection="factored", projection_dim=64)
    est = InfluenceEstimator(CURVATURES[curv](), task, score_dtype=torch.float64, scoring=cfg).fit(model, train)
    exact = reference(model, task, est.curvature_, test, train)
    torch.testing.assert_close(est.pairwise_scores(test), exact, rtol=1e-9, atol=1e-11)
    modes = {e["kind"]: e["mode"] for e in est.plan_["layers"].values()}
    assert modes["linear" if case == "wide" else "conv1d"] == "projected"


@pytest.mark.parametrize("case", CASES)
def test_max_memory_groups_give_identical_scores(case):
    model, task, test, train = CASES[case]()
    est = InfluenceEstimator(DiagScale(damping=0.1), task, score_dtype=torch.float64).fit(model, train)
    full = est.pairwise_scores(test)
    per_query = est.plan_["bytes_per_query"]
    est.set_params(scoring=ScoringConfig(max_memory=int(per_query * 1.5)))
    with pytest.warns(UserWarning, match=r"split into \d+ groups of at most 1 queries"):
        grouped = est.pairwise_scores(test)
    assert est.plan_["query_groups"] == full.shape[0]
    torch.testing.assert_close(grouped, full, rtol=1e-12, atol=1e-14)  # BLAS blocking only
    with pytest.warns(UserWarning, match="split into"):
        v, i = est.top_k(test, 2)
    v0, i0 = torch.topk(full, 2, dim=1)
    torch.testing.assert_close(v, v0)
    with pytest.raises(ValueError, match="cannot hold even one query"):
        est.set_params(scoring=ScoringConfig(max_memory=8)).pairwise_scores(test)


@pytest.mark.parametrize("case", CASES)
def test_batch_size_invariance(case):
    model, task, test, train = CASES[case]()
    est = InfluenceEstimator(Identity(), task, score_dtype=torch.float64).fit(model, train)
    s1 = est.pairwise_scores(test)
    merge = (lambda bs: [tuple(torch.cat(p) for p in zip(*bs))]) if case not in ("lm", "gpt2") else (lambda bs: [{k: torch.cat([b[k] for b in bs]) for k in bs[0]}])
    s2 = est.pairwise_scores(merge(test), merge(train))
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_self_scores_ghost_equal_materialised(case):
    model, task, test, train = CASES[case]()
    ghost = InfluenceEstimator(Identity(damping=2.0), task, score_dtype=torch.float64).fit(model, train).self_scores()
    G = torch.cat([per_sample_grads(model, task, b) for b in train])
    torch.testing.assert_close(ghost, G.pow(2).sum(1) / 2.0, rtol=1e-10, atol=1e-12)


def test_bf16_close_to_default():
    model, task, test, train = wide_case()
    model = model.float()
    train = [(x.float(), y) for x, y in train]
    test = [(x.float(), y) for x, y in test]
    ref = InfluenceEstimator(Identity(), task).fit(model, train).pairwise_scores(test)
    for strategy in ("materialise", "factored"):
        est = InfluenceEstimator(Identity(), task, scoring=ScoringConfig(strategy=strategy, precision="bf16")).fit(model, train)
        s = est.pairwise_scores(test)
        assert s.dtype == torch.float32
        assert torch.corrcoef(torch.stack([s.flatten(), ref.flatten()]))[0, 1] > 0.99


def test_errors():
    model, task, test, train = mlp_case()
    for cfg, msg in [
        (ScoringConfig(strategy="ghost"), "Invalid strategy 'ghost'"),
        (ScoringConfig(projection="trak"), "Invalid projection 'trak'"),
        (ScoringConfig(precision="fp8"), "Invalid precision 'fp8'"),
        (ScoringConfig(query_rank=0), "query_rank must be a positive integer"),
        (ScoringConfig(strategy={"0": "fast"}), "Invalid strategy 'fast'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            InfluenceEstimator(Identity(), task, scoring=cfg).fit(model, train)
    with pytest.raises(TypeError, match="write ScoringConfig"):
        InfluenceEstimator(Identity(), task, scoring=ScoringConfig).fit(model, train)
    with pytest.raises(ValueError, match="Invalid gradient_method 'vmap'"):
        InfluenceEstimator(Identity(), task, gradient_method="vmap").fit(model, train)


def test_logra_exact_on_lm_when_k_covers_layers():
    model, task, test, train = lm_case()
    exact = InfluenceEstimator(Identity(), task, score_dtype=torch.float64).fit(model, train).pairwise_scores(test)
    cfg = ScoringConfig(projection="factored", projection_dim=100)
    est = InfluenceEstimator(Identity(), task, score_dtype=torch.float64, scoring=cfg).fit(model, train)
    torch.testing.assert_close(est.pairwise_scores(test), exact, rtol=1e-9, atol=1e-10)
    assert est.plan_["layers"]["tok"]["mode"] == "projected"


@pytest.mark.parametrize("shape,r", [((3, 60, 80), 5), ((2, 120, 40), 3), ((2, 30, 20), 8)])
def test_truncated_svd_near_optimal_seeded_and_exact_when_wide(shape, r):
    """Randomized rank-r factors (small r) come within 1 % of the optimal rank-r error on
    matrices with a decaying spectrum, are reproducible from the seed, and fall back to the
    exact truncated SVD when 2r + oversample covers the smaller side (shape (2, 30, 20), r=8)."""
    g = torch.Generator().manual_seed(1)
    n, m, k = shape
    U = torch.linalg.qr(torch.randn(n, m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, k, generator=g, dtype=torch.float64)).Q
    spectrum = 0.7 ** torch.arange(min(m, k), dtype=torch.float64)
    W = (U[..., : min(m, k)] * spectrum) @ V[..., : min(m, k)].transpose(1, 2)
    L, R = truncated_svd(W, r, seed=3)
    assert L.shape == (n, m, r) and R.shape == (n, r, k)
    err = torch.linalg.matrix_norm(W - L @ R)
    optimal = spectrum[r:].pow(2).sum().sqrt()
    assert (err <= 1.01 * optimal).all(), (err, optimal)
    L2, R2 = truncated_svd(W, r, seed=3)
    assert torch.equal(L, L2) and torch.equal(R, R2)
    full_L, full_R = truncated_svd(W, min(m, k))
    torch.testing.assert_close(full_L @ full_R, W, rtol=1e-10, atol=1e-12)
