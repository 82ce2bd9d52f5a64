"""Kronecker factors and EK-FAC corrections against naive loops over examples and tokens."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from oracles import loop_grads, take
from influence import EKFAC, KFAC, ClassificationTask, LanguageModelingTask
from influence.gradients.capture import supported_layers
from influence.params import select_parameters

DT = torch.float64


def naive_layer_io(model, task, example, names):
    """Inputs and output gradients of named modules for ONE example, plain autograd."""
    modules = dict(model.named_modules())
    inputs, outputs = {}, {}

    def hook(name):
        def fn(module, args, out):
            inputs[name] = args[0].detach()
            out.retain_grad()
            outputs[name] = out
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        task.loss(model, example).sum().backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return inputs, {n: o.grad.detach() for n, o in outputs.items()}


def naive_factors(model, task, batch, name, mask=None):
    """A (per-token mean) and S (per-example mean of token sums), by explicit loops."""
    module = dict(model.named_modules())[name]
    n = batch[0].shape[0] if isinstance(batch, tuple) else batch["input_ids"].shape[0]
    A, S, tokens = 0, 0, 0
    for i in range(n):
        ex = take(batch, i)
        ins, grads = naive_layer_io(model, task, ex, [name])
        x, s = ins[name][0], grads[name][0]
        if isinstance(module, nn.Conv2d):
            s = s.reshape(s.shape[0], -1).T  # locations x out
            xp = F.pad(x, (1, 1, 1, 1)) if module.padding == (1, 1) else x
            k = module.kernel_size[0]
            rows = []
            for r in range(xp.shape[1] - k + 1):
                for c in range(xp.shape[2] - k + 1):
                    rows.append(xp[:, r : r + k, c : c + k].reshape(-1))
            x = torch.stack(rows)
        elif isinstance(module, nn.Embedding):
            x = F.one_hot(x.reshape(-1), module.num_embeddings).to(DT)
        else:
            x = x.reshape(-1, x.shape[-1])
            s = s.reshape(-1, s.shape[-1])
        if getattr(module, "bias", None) is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=DT)], 1)
        keep = mask[i].bool() if mask is not None else torch.ones(x.shape[0], dtype=torch.bool)
        for t in range(x.shape[0]):
            if keep[t]:
                A = A + torch.outer(x[t], x[t])
                tokens += 1
            S = S + torch.outer(s[t], s[t])
    if isinstance(module, nn.Embedding):
        A = torch.diagonal(A)
    return A / tokens, S / n


def fitted_factors(cur, name):
    st = cur.statistics_
    return st[f"{name}/A"] / st[f"{name}/A_count"], st[f"{name}/S"] / st[f"{name}/S_count"]


@pytest.mark.parametrize("name", ["0", "2"])
def test_linear_factors_equal_naive_covariances(name):
    model = zoo.mlp()
    x, y = zoo.classification_data(n=7)
    cur = KFAC(fisher_type="empirical").fit(model, ClassificationTask(), zoo.batches(x, y, 3))
    A, S = fitted_factors(cur, name)
    A0, S0 = naive_factors(model, ClassificationTask(), (x, y), name)
    torch.testing.assert_close(A, A0)
    torch.testing.assert_close(S, S0)


@pytest.mark.parametrize("name", ["conv1", "conv2"])
def test_conv_factors_equal_naive_patches(name):
    model = zoo.cnn()
    x, y = zoo.image_data(n=3)
    with pytest.warns(UserWarning, match="bn"):
        cur = KFAC(fisher_type="empirical").fit(model, ClassificationTask(), zoo.batches(x, y, 2))
    A, S = fitted_factors(cur, name)
    A0, S0 = naive_factors(model, ClassificationTask(), (x, y), name)
    torch.testing.assert_close(A, A0)
    torch.testing.assert_close(S, S0)


@pytest.mark.parametrize("name", ["tok", "blocks.0.attn.q", "blocks.1.fc2", "lm_head"])
def test_lm_factors_exclude_padding_and_match_naive(name):
    model = zoo.tiny_lm()
    batch = zoo.lm_batch(n=3, T=6, labels=True)
    with pytest.warns(UserWarning):
        cur = KFAC(fisher_type="empirical").fit(model, LanguageModelingTask(), zoo.dict_batches(batch, 2))
    A, S = fitted_factors(cur, name)
    A0, S0 = naive_factors(model, LanguageModelingTask(), batch, name, mask=batch["attention_mask"])
    torch.testing.assert_close(A, A0)
    torch.testing.assert_close(S, S0)
    if name == "tok":  # A is diagonal: token frequencies over non-padding tokens
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        freq = torch.bincount(ids, minlength=13).to(DT) / ids.numel()
        torch.testing.assert_close(A, freq)


def block_matrix(block, G):
    """``(n, P) → (n, d_out, d_in')`` in the block's matrix view."""
    return block.to_matrix(G)


@pytest.mark.parametrize("which", ["mlp", "lm"])
def test_ekfac_corrections_equal_naive_projection_of_loop_grads(which):
    if which == "mlp":
        model, task = zoo.mlp(), ClassificationTask()
        x, y = zoo.classification_data(n=6)
        loader, batches = zoo.batches(x, y, 4), [(x, y)]
    else:
        model, task = zoo.tiny_lm(n_layers=1), LanguageModelingTask()
        batch = zoo.lm_batch(n=3, T=5)
        loader, batches = zoo.dict_batches(batch, 2), [batch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cur = EKFAC(fisher_type="empirical").fit(model, task, loader)
    names = list(cur.layout_.names)
    G = torch.cat([loop_grads(model, task.loss, b, names) for b in batches])
    for block in (b for b in cur.blocks_ if b.method == "kronecker"):
        rotated = block.rotate(block.to_matrix(G))
        torch.testing.assert_close(block.eigenvalues, rotated.pow(2).mean(0))


def test_factor_collection_computes_no_parameter_gradients_and_is_batch_size_invariant():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=6)
    one = EKFAC(fisher_type="empirical").fit(model, ClassificationTask(), zoo.batches(x, y, 6))
    assert all(p.grad is None for p in model.parameters())
    other = EKFAC(fisher_type="empirical").fit(model, ClassificationTask(), zoo.batches(x, y, 1))
    for key, value in one.statistics_.items():
        torch.testing.assert_close(value, other.statistics_[key], msg=key)


def test_true_fisher_sampling_is_seeded():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=6)
    loader = zoo.batches(x, y, 3)
    fits = [EKFAC(fisher_type="true", num_samples=2, seed=s).fit(model, ClassificationTask(), loader) for s in (1, 1, 2)]
    for key in fits[0].statistics_:
        assert torch.equal(fits[0].statistics_[key], fits[1].statistics_[key])
    assert not torch.equal(fits[0].statistics_["2/S"], fits[2].statistics_["2/S"])
    assert fits[0].num_examples_ == 6


def test_true_fisher_many_samples_approaches_ggn_for_one_linear_example():
    # One example, one Linear layer: K-FAC of the true Fisher is exact in expectation, and the
    # expectation is the GGN (= true Fisher for cross-entropy).
    from oracles import dense_ggn

    torch.manual_seed(0)
    model = nn.Linear(3, 3).to(DT)
    x, y = zoo.classification_data(n=1, d_in=3)
    cur = KFAC(fisher_type="true", num_samples=20000, damping=0.0).fit(model, ClassificationTask(), [(x, y)])
    K = cur.matmat(torch.eye(12, dtype=DT))
    ggn = dense_ggn(model, ClassificationTask(), [(x, y)])
    assert (K - ggn).norm() / ggn.norm() < 0.05


class _Shared(nn.Module):
    """One Linear applied twice, one never used, and an Embedding with padding_idx."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.shared = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


def test_shared_unused_and_padding_idx_layers():
    torch.manual_seed(0)
    model = _Shared().to(DT).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (5, 4), generator=g)
    y = torch.randint(0, 2, (5,), generator=g)
    loader = [(ids[:3], y[:3]), (ids[3:], y[3:])]
    cur = EKFAC(fisher_type="empirical").fit(model, ClassificationTask(), loader)
    assert {k: v["method"] for k, v in cur.coverage_.items()} == dict.fromkeys(["emb", "shared", "unused", "head"], "kronecker")
    G = loop_grads(model, ClassificationTask().loss, (ids, y), list(cur.layout_.names))
    for block in cur.blocks_:
        rotated = block.rotate(block.to_matrix(G))
        torch.testing.assert_close(block.eigenvalues, rotated.pow(2).mean(0))
    unused = next(b for b in cur.blocks_ if b.info.name == "unused")
    assert torch.equal(unused.eigenvalues, torch.zeros_like(unused.eigenvalues))
    A, _ = fitted_factors(cur, "emb")
    assert A[0] == 0 and A.sum() < 1  # padding_idx rows carry no gradient and no curvature
