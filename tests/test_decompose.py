"""Per-module and per-token scores: each part against an autograd oracle, parts sum to totals.

Per module: the query preconditioned on the dense torch.func gradients, restricted to each
module's parameters, dotted with the training gradients restricted to them. Per token: the
gradient of the loss with respect to zero-valued per-position copies ``Δ_t`` of every weight
(added to each layer's output at position ``t`` only), which is ``g_t a_tᵀ`` by autograd alone.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from influence import EKFAC, KFAC, ClassificationTask, Diagonal, Exact, Identity, InfluenceEstimator, LanguageModelingTask
from influence.gradients.functional import per_sample_grads
from influence.scoring import ScoringConfig
from test_scoring import CASES, DiagScale, gpt2_case, lm_case, mlp_case, reference

CURVATURES = {
    "identity": lambda: Identity(damping=0.5),
    "diagonal": lambda: Diagonal(damping=0.1),
    "kfac": lambda: KFAC(damping=0.1),
    "ekfac": lambda: EKFAC(damping=0.1),
    "exact": lambda: Exact(damping=0.1),  # couples modules: a decomposition of the sum
}
CONFIGS = {
    "auto": None,
    "materialise": ScoringConfig(strategy="materialise"),
    "factored": ScoringConfig(strategy="factored"),
    "logra": ScoringConfig(projection="factored", projection_dim=4),
}


def module_oracle(est, model, task, test, train):
    """``(n_test, n_train, M)``: ``q_{i,m}ᵀ ∇_{θ_m} ℓ_j`` from dense torch.func gradients."""
    Q = est.curvature_.solve(torch.cat([per_sample_grads(model, task, b, objective="measurement") for b in test]))
    G = torch.cat([per_sample_grads(model, task, b) for b in train])
    slices = est.layout_.slices()
    parts = []
    for entry in est.gradient_coverage_.values():
        cols = torch.cat([torch.arange(slices[p].start, slices[p].stop) for p in entry["parameters"]])
        parts.append(Q[:, cols] @ G[:, cols].T)
    return torch.stack(parts, -1)


@pytest.mark.parametrize("case", ["mlp", "cnn", "lm", "gpt2"])
@pytest.mark.parametrize("curv", [pytest.param(c, marks=pytest.mark.slow) if c == "exact" else c for c in CURVATURES])
def test_per_module_scores_match_the_oracle_and_sum_to_totals(case, curv):
    model, task, test, train = CASES[case]()
    est = InfluenceEstimator(CURVATURES[curv](), task, score_dtype=torch.float64).fit(model, train)
    total = est.pairwise_scores(test)
    parts = est.pairwise_scores(test, per_module=True)
    assert parts.shape == (*total.shape, len(est.module_names_))
    assert est.module_names_ == tuple(est.gradient_coverage_)
    torch.testing.assert_close(parts, module_oracle(est, model, task, test, train), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(parts.sum(-1), total, rtol=1e-12, atol=1e-12)
    assert (parts != 0).any(dim=(0, 1)).sum() >= 2  # a real split, not all in one module


@pytest.mark.parametrize("case", ["mlp", "cnn", "lm"])
@pytest.mark.parametrize("config", CONFIGS)
def test_per_module_every_scoring_strategy(case, config):
    """Ghost, low-rank, materialised and LoGra-projected queries split the same way."""
    model, task, test, train = CASES[case]()
    cfg = CONFIGS[config]
    for curv in (Identity(damping=0.5), DiagScale(damping=0.1)):
        est = InfluenceEstimator(curv, task, score_dtype=torch.float64, scoring=cfg).fit(model, train)
        parts = est.pairwise_scores(test, per_module=True)
        torch.testing.assert_close(parts.sum(-1), est.pairwise_scores(test), rtol=1e-12, atol=1e-12)
        if config != "logra":  # projection_dim=4 is inexact by design
            torch.testing.assert_close(parts, module_oracle(est, model, task, test, train), rtol=1e-9, atol=1e-11)


def _position_copies(model: nn.Module, T: int):
    """Zero ``Δ`` per position for every Linear/Conv1D/Embedding/LayerNorm, added to the output
    at that position; returns ``({parameter name: [Δ, ...]}, hook handles)``."""
    names = {id(p): n for n, p in model.named_parameters()}
    deltas, handles = {}, []

    def add(param, shape):
        d = torch.zeros(T, *shape, dtype=param.dtype, requires_grad=True)
        deltas.setdefault(names[id(param)], []).append(d)
        return d

    for m in model.modules():
        kind = type(m).__name__
        if isinstance(m, nn.Linear) or kind == "Conv1D":
            D = add(m.weight, m.weight.shape)
            Db = add(m.bias, m.bias.shape) if m.bias is not None else None
            eq = "bti,tio->bto" if kind == "Conv1D" else "bti,toi->bto"

            def hook(mod, inp, out, D=D, Db=Db, eq=eq):
                out = out + torch.einsum(eq, inp[0], D)
                return out if Db is None else out + Db
        elif isinstance(m, nn.Embedding):
            D = add(m.weight, m.weight.shape)

            def hook(mod, inp, out, D=D):
                return out + D[torch.arange(inp[0].shape[-1]), inp[0]]
        elif isinstance(m, nn.LayerNorm):
            D, Db = add(m.weight, m.weight.shape), add(m.bias, m.bias.shape)

            def hook(mod, inp, out, D=D, Db=Db):
                return out + F.layer_norm(inp[0], mod.normalized_shape, eps=mod.eps) * D + Db
        else:
            continue
        handles.append(m.register_forward_hook(hook))
    return deltas, handles


def token_oracle(est, model, task, test, train):
    """``(n_test, n_train, T)`` by autograd through the per-position copies, one example at a time."""
    Q = est.curvature_.solve(torch.cat([per_sample_grads(model, task, b, objective="measurement") for b in test]))
    T = max(b["input_ids"].shape[1] for b in train)
    rows = []
    for batch in train:
        for j in range(batch["input_ids"].shape[0]):
            one = {k: v[j : j + 1] for k, v in batch.items()}
            t = one["input_ids"].shape[1]
            deltas, handles = _position_copies(model, t)
            try:
                loss = task.loss(model, one).sum()
            finally:
                for h in handles:
                    h.remove()
            order = [(p, d) for p in est.layout_.names for d in deltas[p]]
            grads = torch.autograd.grad(loss, [d for _, d in order], allow_unused=True)
            per_param = {}
            for (p, d), g in zip(order, grads):
                g = torch.zeros_like(d) if g is None else g
                per_param[p] = per_param.get(p, 0) + g.reshape(t, -1)
            G_tok = torch.cat([per_param[p] for p in est.layout_.names], 1)  # (t, P)
            rows.append(F.pad(Q @ G_tok.T, (0, T - t)))
    return torch.stack(rows, 1)


@pytest.mark.parametrize("case", ["lm", "gpt2"])
@pytest.mark.parametrize("curv", ["identity", "kfac", pytest.param("exact", marks=pytest.mark.slow)])
def test_per_token_scores_match_the_autograd_oracle(case, curv):
    """TinyLM and GPT-2 (HF Conv1D, ``wte`` tied to ``lm_head``: both members split by token)."""
    model, task, test, train = CASES[case]()
    est = InfluenceEstimator(CURVATURES[curv](), task, score_dtype=torch.float64).fit(model, train)
    total = est.pairwise_scores(test)
    tokens = est.pairwise_scores(test, per_token=True)
    assert tokens.shape == (*total.shape, 8)
    torch.testing.assert_close(tokens, token_oracle(est, model, task, test, train), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(tokens.sum(-1), total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
def test_per_token_every_scoring_strategy_sums_to_totals(config):
    model, task, test, train = lm_case()
    for curv in (Identity(damping=0.5), DiagScale(damping=0.1)):
        est = InfluenceEstimator(curv, task, score_dtype=torch.float64, scoring=CONFIGS[config]).fit(model, train)
        tokens = est.pairwise_scores(test, per_token=True)
        torch.testing.assert_close(tokens.sum(-1), est.pairwise_scores(test), rtol=1e-12, atol=1e-12)
        if config != "logra":
            torch.testing.assert_close(tokens, token_oracle(est, model, task, test, train), rtol=1e-9, atol=1e-11)


def test_padding_tokens_score_exactly_zero():
    """Right padding inside a batch, and shorter batches padded to the longest sequence."""
    model, task = zoo.tiny_lm(), LanguageModelingTask()
    long = zoo.lm_batch(n=4, T=8, seed=1, lengths=[8, 5, 3, 6])
    short = zoo.lm_batch(n=3, T=5, seed=2, lengths=[5, 2, 4])
    train, test = [long, short], [zoo.lm_batch(n=2, seed=3)]
    est = InfluenceEstimator(EKFAC(damping=0.1), task, score_dtype=torch.float64).fit(model, train)
    tokens = est.pairwise_scores(test, per_token=True)
    assert tokens.shape == (2, 7, 8)
    for j, length in enumerate([8, 5, 3, 6, 5, 2, 4]):
        assert torch.equal(tokens[:, j, length:], torch.zeros_like(tokens[:, j, length:]))
        assert (tokens[:, j, : length - 1] != 0).all()
    torch.testing.assert_close(tokens.sum(-1), est.pairwise_scores(test), rtol=1e-12, atol=1e-12)


def test_left_padding_keeps_the_term_predicting_the_first_real_token():
    """Left padding: LanguageModelingTask's loss predicts the first real token from the last
    padding position, so that position (only) carries a term; the sums stay exact."""
    model, task = zoo.tiny_lm(), LanguageModelingTask()
    right = zoo.lm_batch(n=3, T=8, seed=1, lengths=[8, 5, 3])
    pads = 8 - right["attention_mask"].sum(1)
    left = {k: torch.stack([v[i].roll(int(pads[i])) for i in range(3)]) for k, v in right.items()}
    est = InfluenceEstimator(Identity(), task, score_dtype=torch.float64).fit(model, [left])
    tokens = est.pairwise_scores([zoo.lm_batch(n=2, seed=3)], per_token=True)
    for j, p in enumerate(pads.tolist()):
        assert not tokens[:, j, : max(p - 1, 0)].any()
        assert p == 0 or tokens[:, j, p - 1].abs().min() > 0
    torch.testing.assert_close(tokens.sum(-1), est.pairwise_scores([zoo.lm_batch(n=2, seed=3)]), rtol=1e-12, atol=1e-12)


def test_split_scores_under_query_groups_and_aggregation():
    """max_memory groups and an aggregated query give the same splits."""
    model, task, test, train = lm_case()
    est = InfluenceEstimator(DiagScale(damping=0.1), task, score_dtype=torch.float64).fit(model, train)
    full = {k: est.pairwise_scores(test, **{k: True}) for k in ("per_module", "per_token")}
    est.set_params(scoring=ScoringConfig(max_memory=int(est.plan_["bytes_per_query"] * 1.5)))
    for k, ref in full.items():
        with pytest.warns(UserWarning, match="split into 3 groups"):
            torch.testing.assert_close(est.pairwise_scores(test, **{k: True}), ref, rtol=1e-12, atol=1e-14)
    est.set_params(scoring=None)
    for k, ref in full.items():
        torch.testing.assert_close(est.pairwise_scores(test, aggregate_queries=True, **{k: True}), ref.mean(0, keepdim=True), rtol=1e-10, atol=1e-13)


class PooledLM(nn.Module):
    """A TinyLM plus a Linear on the mean hidden state (one position per example)."""

    def __init__(self):
        super().__init__()
        self.lm = zoo.tiny_lm()
        self.pool = nn.Linear(8, 8).double()

    def forward(self, input_ids, attention_mask=None):
        h = self.lm.hidden_states(input_ids, attention_mask)
        return self.lm.lm_head(h + self.pool(h.mean(1))[:, None])


class ScaledLM(nn.Module):
    """A TinyLM whose logits are multiplied by a bare parameter (torch.func path)."""

    def __init__(self):
        super().__init__()
        self.lm = zoo.tiny_lm()
        self.temperature = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        return self.lm(input_ids, attention_mask) * self.temperature


def test_errors():
    model, task, test, train = mlp_case()
    est = InfluenceEstimator(Identity(), task).fit(model, train)
    with pytest.raises(ValueError, match="task is ClassificationTask, not a LanguageModelingTask"):
        est.pairwise_scores(test, per_token=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        est.pairwise_scores(test, per_module=True, per_token=True)
    for kw in ("per_module", "per_token"):
        with pytest.raises(ValueError, match=f"{kw}=True cannot be written to out="):
            est.pairwise_scores(test, out="never.npy", **{kw: True})
    with pytest.raises(TypeError, match="per_module must be True or False; got 'yes'"):
        est.pairwise_scores(test, per_module="yes")
    with pytest.raises(ValueError, match="Invalid aggregate_queries 'max'"):
        est.pairwise_scores(test, aggregate_queries="max")
    with pytest.raises(ValueError, match="Invalid aggregate_queries 2"):
        est.top_k(test, 2, aggregate_queries=2)
    est.set_params(scoring=ScoringConfig(projection="dense", projection_dim=8))
    with pytest.raises(ValueError, match="per_module=True is not available with projection='dense'"):
        est.pairwise_scores(test, per_module=True)

    lm_task, lm_test = LanguageModelingTask(), [zoo.lm_batch(n=2, seed=3)]
    lm_train = [zoo.lm_batch(n=3)]
    func = InfluenceEstimator(Identity(), lm_task, gradient_method="func").fit(zoo.tiny_lm(), lm_train)
    with pytest.raises(ValueError, match=r"needs every attributed parameter on the hook path.*tok.weight in module 'tok' \(torch.func by choice\)"):
        func.pairwise_scores(lm_test, per_token=True)
    scaled = InfluenceEstimator(Identity(), lm_task).fit(ScaledLM().eval(), lm_train)
    with pytest.raises(ValueError, match=r"computed by torch.func.*: temperature in module ''.*params="):
        scaled.pairwise_scores(lm_test, per_token=True)
    scaled.set_params(params="lm.*").fit(scaled.model_, lm_train)  # without it: fine
    torch.testing.assert_close(scaled.pairwise_scores(lm_test, per_token=True).sum(-1), scaled.pairwise_scores(lm_test))
    pooled = InfluenceEstimator(Identity(), lm_task).fit(PooledLM().eval(), lm_train)
    with pytest.raises(ValueError, match="layer 'pool' sees 1 positions per example but the sequences have 8 tokens"):
        pooled.pairwise_scores(lm_test, per_token=True)
