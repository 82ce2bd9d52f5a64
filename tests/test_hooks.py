"""The hook path equals torch.func and the loop oracle in float64 (MLP, CNN, LM with padding)."""

import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import zoo
from oracles import loop_grads
from influence import ClassificationTask, LanguageModelingTask, select_parameters
from influence.exceptions import InfluenceError
from influence.gradients.functional import per_sample_grads
from influence.gradients.hooks import GradientComputer, fast_per_sample_grads, hook_layers


class BagOfTokens(nn.Module):
    """Embedding with ``padding_idx`` (its rows never get a gradient) -> mean -> Linear."""

    def __init__(self, vocab=7, dim=3, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def bag_of_tokens():
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (5, 6))
    ids[:, -2:] = 0  # padding, and ids repeated within an example
    return BagOfTokens().double(), ClassificationTask(), (ids, torch.randint(0, 3, (5,)))


def cases():
    yield "embedding_padding_idx", *bag_of_tokens()
    x, y = zoo.classification_data(n=7)
    yield "mlp", zoo.mlp(hidden=(6, 5)), ClassificationTask(), (x, y)
    yield "cnn", zoo.cnn(), ClassificationTask(), zoo.image_data(n=5)
    yield "lm", zoo.tiny_lm(), LanguageModelingTask(), zoo.lm_batch(n=5)
    yield "lm_labels", zoo.tiny_lm(seed=1), LanguageModelingTask(), zoo.lm_batch(n=4, labels=True)


CASES = list(cases())


@pytest.mark.parametrize("name,model,task,batch", CASES, ids=[c[0] for c in CASES])
def test_hooks_equal_func_and_loop(name, model, task, batch):
    ref = per_sample_grads(model, task, batch)
    comp = GradientComputer(model, task, select_parameters(model), method="hooks")
    got = comp.flat(batch)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, loop_grads(model, task.loss, batch), rtol=1e-10, atol=1e-12)
    assert comp.layers  # the hook path really ran


def test_lm_mixes_hooks_and_func():
    model = zoo.tiny_lm()
    for p in model.ln_f.parameters():  # ln_f bias only: ln_f goes to torch.func
        pass
    model.ln_f.weight.requires_grad_(False)
    layout = select_parameters(model)
    comp = GradientComputer(model, LanguageModelingTask(), layout)
    assert "ln_f" not in comp.layers and "ln_f.bias" in comp.rest_layout.names
    batch = zoo.lm_batch(n=3)
    torch.testing.assert_close(comp.flat(batch), per_sample_grads(model, LanguageModelingTask(), batch, layout), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,model,task,batch", CASES, ids=[c[0] for c in CASES])
def test_ghost_dots_and_norms_equal_materialised(name, model, task, batch):
    comp = GradientComputer(model, task, select_parameters(model))
    gx = comp.compute(batch)
    G = gx.flat()
    torch.testing.assert_close(gx.dot(gx), G @ G.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx.sq_norms(), G.pow(2).sum(1), rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    d_in=st.integers(1, 5), hidden=st.integers(1, 6), d_out=st.integers(2, 4),
    n=st.integers(1, 6), T=st.integers(1, 3), bias=st.booleans(),
)
def test_linear_shapes_property(d_in, hidden, d_out, n, T, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(hidden * T, d_out)).double()
    x = torch.randn(n, T, d_in, dtype=torch.float64)
    y = torch.randint(0, d_out, (n,))
    task = ClassificationTask()
    ref = per_sample_grads(model, task, (x, y))
    got = fast_per_sample_grads(model, task, (x, y), method="hooks")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_batch_size_invariance():
    model, task = zoo.tiny_lm(), LanguageModelingTask()
    batch = zoo.lm_batch(n=6)
    comp = GradientComputer(model, task, select_parameters(model))
    whole = comp.flat(batch)
    parts = torch.cat([comp.flat(b) for b in zoo.dict_batches(batch, 4)])
    torch.testing.assert_close(whole, parts, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,model,task,batch", CASES, ids=[c[0] for c in CASES])
def test_reused_buffer_is_written(name, model, task, batch):
    """Every entry of a reused buffer is written (it starts as NaN; strided GEMM and embedding
    scatter views) and equals torch.func."""
    comp = GradientComputer(model, task, select_parameters(model))
    n = task.num_examples(batch)
    buf = torch.full((n, comp.layout.num_params), float("nan"), dtype=torch.float64)
    out = comp.flat(batch, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out, per_sample_grads(model, task, batch), rtol=1e-10, atol=1e-12)


def test_errors():
    model = zoo.mlp()
    with pytest.raises(ValueError, match="Invalid gradient_method 'fast'"):
        GradientComputer(model, ClassificationTask(), select_parameters(model), method="fast")

    class OnlyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return x * self.scale

    m = OnlyScale()
    with pytest.raises(InfluenceError, match="gradient_method='hooks' but no attributed parameter"):
        GradientComputer(m, ClassificationTask(), select_parameters(m), method="hooks")


def test_layer_without_batch_axis_goes_to_func():
    """The plan traces no batch axis for an embedding of (T,) positions: torch.func, with the
    reason in the coverage; gradient_method='hooks' refuses, naming it."""

    class Shared(nn.Module):  # an embedding fed (T,) positions: not batch-first
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(4, 3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x + self.pos(torch.arange(3)).sum(0))

    torch.manual_seed(0)
    m = Shared().double()
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))
    comp = GradientComputer(m, ClassificationTask(), select_parameters(m))
    got = comp.flat(batch)
    torch.testing.assert_close(got, per_sample_grads(m, ClassificationTask(), batch))
    coverage = comp.coverage()
    assert coverage["pos"]["path"] == "func" and "no single axis" in coverage["pos"]["reason"]
    assert coverage["fc"]["path"] == "hooks" and coverage["fc"]["batch_axis"] == 0
    strict = GradientComputer(m, ClassificationTask(), select_parameters(m), method="hooks")
    with pytest.raises(InfluenceError, match="hook path cannot compute 'pos': no single axis"):
        strict.flat(batch)


def test_layers_found():
    names = set(hook_layers(zoo.tiny_lm(), select_parameters(zoo.tiny_lm())))
    assert {"tok", "pos", "lm_head", "ln_f", "blocks.0.attn.q", "blocks.0.ln1"} <= names


class _ConvNet(nn.Module):
    """One Conv2d (optionally applied twice, sharing its weight) → mean pool → Linear."""

    def __init__(self, conv: nn.Conv2d, twice: bool):
        super().__init__()
        self.conv, self.twice = conv, twice
        self.fc = nn.Linear(conv.out_channels, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        if self.twice:
            h = torch.tanh(self.conv(h[:, : self.conv.in_channels]))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "kw,twice",
    [
        (dict(kernel_size=3, padding=1), False),
        (dict(kernel_size=(2, 3), stride=2, padding=(1, 2)), False),
        (dict(kernel_size=3, dilation=2, padding="valid", bias=False), False),
        (dict(kernel_size=3, stride=(1, 2), padding=1), True),
    ],
)
def test_conv_geometries_grouped_and_patch_paths(kw, twice):
    """Per-example conv gradients by grouped convolution (a conv called once) and by patches
    (called twice) equal torch.func for strides, dilation, asymmetric padding and kernels."""
    torch.manual_seed(0)
    model = _ConvNet(nn.Conv2d(4, 4, **kw), twice).double().eval()
    batch = (torch.randn(5, 4, 9, 11, dtype=torch.float64), torch.randint(0, 3, (5,)))
    task = ClassificationTask()
    comp = GradientComputer(model, task, select_parameters(model), method="hooks")
    bg = comp.compute(batch)
    assert (bg.layers["conv"].x is not None) is (not twice)  # raw input kept only when called once
    ref = per_sample_grads(model, task, batch)
    torch.testing.assert_close(bg.flat(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bg.flat(out=torch.full_like(ref, float("nan"))), ref, rtol=1e-10, atol=1e-12)
    # the patches made on demand give the same gradients and ghost products
    torch.testing.assert_close(bg.dot(bg), ref @ ref.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bg.sq_norms(), ref.pow(2).sum(1), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- tied weights
class TiedLM(nn.Module):
    """``emb (padding_idx 0) → tanh(fc) → head`` with ``head.weight is emb.weight`` (a registered
    tie, as in GPT-2 and nanoGPT). ``twice``: the head is also applied to ``tanh(h)`` (a member
    called twice); ``seq_first``: the body and the head run sequence-first ``(T, B, d)``."""

    def __init__(self, vocab=7, d=3, twice=False, seq_first=False):
        super().__init__()
        self.twice, self.seq_first = twice, seq_first
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids.T if self.seq_first else input_ids)
        h = torch.tanh(self.fc(h))
        logits = self.head(h) + (self.head(torch.tanh(h)) if self.twice else 0)
        return logits.transpose(0, 1) if self.seq_first else logits


class SharedSquare(nn.Module):
    """Two Linear layers sharing one weight, each with its own (attributed) bias, then a head."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class SharedConv(nn.Module):
    """Two Conv2d sharing one weight (the first called once: raw-input path; the second twice:
    patch path), mean pool, Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(torch.tanh(self.b(h))))
        return self.fc(h.mean(dim=(2, 3)))


def _seeded(cls, **kw):
    torch.manual_seed(0)
    return cls(**kw).double().eval()


def tied_cases():
    LM, CLS = LanguageModelingTask(), ClassificationTask()
    yield "emb_linear", _seeded(TiedLM), LM, zoo.lm_batch(n=5, T=6, vocab=7), "emb", "tied: contributions of emb (Embedding) and head (Linear) summed"
    yield "emb_linear_twice", _seeded(TiedLM, twice=True), LM, zoo.lm_batch(n=4, T=5, vocab=7, seed=1), "emb", None
    yield "emb_linear_seq_first_B_eq_T", _seeded(TiedLM, seq_first=True), LM, zoo.lm_batch(n=6, T=6, vocab=7, seed=2), "emb", None
    x, y = zoo.classification_data(n=5)
    yield "linear_linear", _seeded(SharedSquare), CLS, (x, y), "first", "tied: contributions of first (Linear) and second (Linear) summed"
    img, lab = zoo.image_data(n=4)
    yield "conv_conv", _seeded(SharedConv), CLS, (img, lab % 2), "a", None


TIED = list(tied_cases())


@pytest.mark.parametrize("name,model,task,batch,owner,reason", TIED, ids=[c[0] for c in TIED])
def test_tied_weights_are_summed_on_the_hook_path(name, model, task, batch, owner, reason, monkeypatch):
    """A registered tie stays on the hook path (the contributions of every module holding the
    weight, summed): flat/sq_norms/dot equal torch.func and the autograd loop, and no
    torch.func pass runs at all."""
    layout = select_parameters(model)
    ref = per_sample_grads(model, task, batch, layout)
    torch.testing.assert_close(ref, loop_grads(model, task.loss, batch), rtol=1e-10, atol=1e-12)
    comp = GradientComputer(model, task, layout, method="hooks")

    def no_vmap(*args, **kwargs):
        raise AssertionError("a torch.func pass ran although every parameter is on the hook path")

    monkeypatch.setattr("influence.gradients.hooks.per_sample_grads", no_vmap)
    bg = comp.compute(batch)
    assert comp.func_layout is None and comp.ties
    G = bg.flat()
    torch.testing.assert_close(G, ref, rtol=1e-10, atol=1e-12)
    n = task.num_examples(batch)
    torch.testing.assert_close(bg.flat(out=torch.full((n, layout.num_params), float("nan"), dtype=torch.float64)), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bg.dot(bg), ref @ ref.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bg.sq_norms(), ref.pow(2).sum(1), rtol=1e-10, atol=1e-12)
    entry = comp.coverage()[owner]
    assert entry["path"] == "hooks" and entry["reason"].startswith("tied: contributions of"), entry
    if reason is not None:
        assert entry["reason"] == reason
    if name == "linear_linear":  # the follower's own bias: summed with the tie, reported with it
        assert comp.coverage()["second"] == {**entry, "parameters": ("second.bias",), "num_params": 4}
    assert comp.plan.self_checked


def test_tied_and_func_parameters_share_the_dense_block():
    """A tie (summed on the hook path) next to a parameter only torch.func computes: both in
    ``rest`` in layout order, the torch.func pass restricted to the latter."""
    model = _seeded(TiedLM)
    model.register_parameter("scale", nn.Parameter(torch.tensor(1.5, dtype=torch.float64)))
    model.forward = lambda input_ids, attention_mask=None: TiedLM.forward(model, input_ids) * model.scale
    task, batch = LanguageModelingTask(), zoo.lm_batch(n=4, T=5, vocab=7)
    layout = select_parameters(model)
    comp = GradientComputer(model, task, layout)
    G = comp.flat(batch)
    torch.testing.assert_close(G, loop_grads(model, task.loss, batch, list(layout.names)), rtol=1e-10, atol=1e-12)
    assert comp.func_layout.names == ("scale",)
    assert comp.rest_layout.names == tuple(n for n in layout.names if n in ("emb.weight", "scale"))
    bg = comp.compute(batch)
    torch.testing.assert_close(bg.dot(bg), G @ G.T, rtol=1e-10, atol=1e-12)


class _FunctionalToo(TiedLM):
    """The registered tie plus a functional use of the same weight (``h @ emb.weight.T``)."""

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fc(self.emb(input_ids)))
        return self.head(h) + h @ self.emb.weight.T


class _FrozenFollowerBias(TiedLM):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 7)
        self.head.weight = self.emb.weight
        self.head.bias.requires_grad_(False)


class _SharedInputFollower(TiedLM):
    """A second layer holding the tied weight runs on an input shared by the batch (leading 1)."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(3, 7, bias=False)
        self.side.weight = self.emb.weight

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fc(self.emb(input_ids)))
        return self.head(h) + self.side(torch.ones(1, 1, 3, dtype=h.dtype))


class _MixedBeforeHead(TiedLM):
    """Mixes the examples of a batch before the tied head: no probe sees it, the self-check of
    the summed gradient does."""

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fc(self.emb(input_ids)))
        return self.head(h + h.mean(0, keepdim=True))


@pytest.mark.parametrize(
    "cls,why",
    [
        (_FunctionalToo, r"used by <root> \(_FunctionalToo\) via \.T \(tied or functional use\)"),
        (_FrozenFollowerBias, r"tied with head \(Linear\), whose bias head.bias is not attributed"),
        (_SharedInputFollower, r"tied with side \(Linear\), whose batch axis is not traced: its input is shared by the batch"),
    ],
)
def test_ties_the_hook_path_cannot_sum_go_to_func(cls, why):
    model = _seeded(cls)
    task, batch = LanguageModelingTask(), zoo.lm_batch(n=4, T=5, vocab=7)
    layout = select_parameters(model)
    comp = GradientComputer(model, task, layout)
    G = comp.flat(batch)
    torch.testing.assert_close(G, loop_grads(model, task.loss, batch, list(layout.names)), rtol=1e-10, atol=1e-12)
    entry = comp.coverage()["emb"]
    assert entry["path"] == "func" and re.search(why, entry["reason"]), entry
    assert not comp.ties and "emb.weight" in comp.func_layout.names


def test_self_check_compares_the_summed_gradient():
    from influence.exceptions import FallbackWarning

    model = _seeded(_MixedBeforeHead)
    task, batch = LanguageModelingTask(), zoo.lm_batch(n=4, T=5, vocab=7)
    layout = select_parameters(model)
    comp = GradientComputer(model, task, layout)
    with pytest.warns(FallbackWarning, match=r"Self-check: .*'emb' \(off by"):
        G = comp.flat(batch)
    entry = comp.coverage()["emb"]
    assert entry["path"] == "func" and "self-check" in entry["reason"]
    torch.testing.assert_close(G, loop_grads(model, task.loss, batch, list(layout.names)), rtol=1e-10, atol=1e-12)


def test_stock_gpt2_runs_no_torch_func_pass(monkeypatch):
    """Stock GPT-2 with every parameter attributed: ``wte`` (tied to ``lm_head``) is summed on
    the hook path, so no vmap pass runs; the gradients equal the autograd loop."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=13, n_positions=12, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=1, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    task, batch = LanguageModelingTask(), zoo.lm_batch(n=4, T=6, vocab=13, labels=True)
    layout = select_parameters(model)
    monkeypatch.setattr("influence.gradients.hooks.per_sample_grads", lambda *a, **k: pytest.fail("torch.func pass"))
    comp = GradientComputer(model, task, layout)
    G = comp.flat(batch)
    assert comp.func_layout is None and comp.rest_layout.names == ("transformer.wte.weight",)
    torch.testing.assert_close(G, loop_grads(model, task.loss, batch, list(layout.names)), rtol=1e-9, atol=1e-12)
    assert comp.coverage()["transformer.wte"]["reason"] == "tied: contributions of transformer.wte (Embedding) and lm_head (Linear) summed"


def test_self_check_accepts_a_zero_gradient_in_float32():
    """The attention key bias has an exactly zero gradient (softmax ignores a shift shared by
    all keys): in float32 both paths return rounding noise there, which the self-check must not
    take for a mismatch (it sent every float32 TinyLM's ``attn.k`` to torch.func)."""
    import warnings

    for seed in range(3):
        model = zoo.tiny_lm(seed=seed, d_model=32, n_heads=4).float()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no FallbackWarning
            comp = GradientComputer(model, LanguageModelingTask(), select_parameters(model))
            comp.prepare(zoo.lm_batch(n=6, seed=seed))
        assert not comp.plan.rejected and comp.func_layout is None
