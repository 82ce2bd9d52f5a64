"""The default path is exact on the architectures users bring, checked against an autograd loop.

Every model of the zoo (stock HF GPT-2 with tied embeddings in its sdpa and eager attention, a
tiny Llama, a nanoGPT-style model with learned positions at B == T, PyTorch's
``nn.TransformerEncoderLayer`` batch-first and sequence-first at B == T and B != T, LSTM,
GRU, a ResNet-style CNN with BatchNorm in eval mode at 32×32, tied embedding/output LMs with a
module tie and a functional tie, a module called twice) gets:

- Identity pairwise and self scores equal to the loop-of-autograd oracle (float64, 1e-5
  relative) with the default ``gradient_method="auto"``;
- an honest ``gradient_coverage_``: which modules take the hook path, on which batch axis, and
  why the others do not (tied weights, no batch axis);
- an EK-FAC fit whose ``coverage_`` names the same reasons.

Registered ties (GPT-2's and nanoGPT's ``wte`` with ``lm_head``) take the hook path with the
contributions of every layer holding the weight summed; the functional tie takes torch.func.
Before the layer plan (influence.gradients.plan), GPT-2's tied ``wte``, the sequence-first
layers at B == T, nanoGPT's ``wpe(arange(T))`` at B == T and the functional tie all gave wrong
scores without a word.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from influence import EKFAC, ClassificationTask, Identity, InfluenceEstimator, LanguageModelingTask
from influence.exceptions import FallbackWarning
from oracles import loop_grads
from zoo import DT, lm_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 13


# ----------------------------------------------------------------------------------- models
def hf_gpt2(attn: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2,
        bos_token_id=1, eos_token_id=1, attn_implementation=attn,
    )
    model = transformers.GPT2LMHeadModel(config).to(DT).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # stock GPT-2: tied
    return model


def hf_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).to(DT).eval()


class NanoGPT(nn.Module):
    """nanoGPT's embedding scheme: ``wte(ids) + wpe(arange(T))`` (a ``(T, d)`` tensor shared by
    the batch), one MLP block, and ``lm_head`` tied to ``wte``."""

    def __init__(self, d=8):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(16, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids, attention_mask=None):
        T = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
        x = x + self.proj(torch.tanh(self.fc(self.ln(x))))
        return self.lm_head(x)


class FunctionalTie(nn.Module):
    """Output logits ``h @ emb.weight.T``: the embedding is used outside its module."""

    def __init__(self, d=6):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.fc = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None):
        return torch.tanh(self.fc(self.emb(input_ids))) @ self.emb.weight.T


class ModuleTie(FunctionalTie):
    """The same LM with a registered tie: ``head.weight is emb.weight``."""

    def __init__(self, d=6):
        super().__init__(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.fc(self.emb(input_ids))))


class Encoder(nn.Module):
    """Token classifier around ``nn.TransformerEncoderLayer``, either layout."""

    def __init__(self, batch_first: bool, d=8):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids if self.batch_first else ids.T)  # sequence-first: (T, B) ids
        h = self.layer(h)
        return self.head(h.mean(1 if self.batch_first else 0))


class Recurrent(nn.Module):
    def __init__(self, cell: type, d=5):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.rnn = cell(d, d, num_layers=2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


class ResidualBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if (stride != 1 or c_in != c_out) else nn.Identity()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    """ResNet-18's layout at small widths: stem conv + BN, residual stages, pooling, Linear."""

    def __init__(self, widths=(4, 6, 8), classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(ResidualBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


class CalledTwice(nn.Module):
    """One Linear applied twice in a forward (a shared layer)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet().to(DT)
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).to(DT).eval()


# ----------------------------------------------------------------------------------- data
def lm_data(n_train=6, n_test=3, T=6):
    train = lm_batch(n=n_train, T=T, vocab=VOCAB, seed=1)
    test = lm_batch(n=n_test, T=T, vocab=VOCAB, seed=2)
    return [train], [test]


def token_classes(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)


def seq_data(B, T):
    """Training and query batches of ``B`` sequences of length ``T`` (queries too: with B == T
    everywhere, no batch of another size can reveal a misread batch axis by a shape error)."""
    return [token_classes(B, T, 1)], [token_classes(B, T, 2)]


def image_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


# (id, model builder, task, data builder, {module: expected gradient path (and axis, and the
# reason of a tie summed on the hook path)})
LM, CLS = LanguageModelingTask(), ClassificationTask()
CASES = [
    ("gpt2_sdpa", lambda: hf_gpt2("sdpa"), LM, lm_data, {"transformer.wte": ("hooks", 0, "tied: contributions of transformer.wte (Embedding) and lm_head (Linear) summed"), "transformer.wpe": ("hooks", None), "transformer.h.0.attn.c_attn": ("hooks", 0)}),
    ("gpt2_eager", lambda: hf_gpt2("eager"), LM, lm_data, {"transformer.wte": ("hooks", 0, "tied: contributions of transformer.wte (Embedding) and lm_head (Linear) summed"), "transformer.wpe": ("hooks", None)}),
    ("llama", hf_llama, LM, lm_data, {"model.embed_tokens": ("hooks", 0), "model.layers.0.self_attn.q_proj": ("hooks", 0)}),
    ("nanogpt_B_eq_T", lambda: seeded(NanoGPT), LM, lambda: lm_data(n_train=6, n_test=6, T=6), {"wte": ("hooks", 0, "tied: contributions of wte (Embedding) and lm_head (Linear) summed"), "wpe": "func", "fc": ("hooks", 0)}),
    ("module_tie", lambda: seeded(ModuleTie), LM, lm_data, {"emb": ("hooks", 0, "tied: contributions of emb (Embedding) and head (Linear) summed"), "fc": ("hooks", 0)}),
    ("functional_tie", lambda: seeded(FunctionalTie), LM, lm_data, {"emb": "func", "fc": ("hooks", 0)}),
    ("encoder_batch_first_B_eq_T", lambda: seeded(Encoder, True), CLS, lambda: seq_data(6, 6), {"layer.linear1": ("hooks", 0), "layer.norm1": ("hooks", 0)}),
    ("encoder_seq_first_B_eq_T", lambda: seeded(Encoder, False), CLS, lambda: seq_data(6, 6), {"layer.linear1": ("hooks", 1), "layer.norm2": ("hooks", 1), "emb": ("hooks", 1)}),
    ("encoder_seq_first_B_ne_T", lambda: seeded(Encoder, False), CLS, lambda: seq_data(4, 6), {"layer.linear2": ("hooks", 1)}),
    ("lstm", lambda: seeded(Recurrent, nn.LSTM), CLS, lambda: seq_data(5, 4), {"rnn": "func", "emb": ("hooks", 0)}),
    ("gru", lambda: seeded(Recurrent, nn.GRU), CLS, lambda: seq_data(5, 4), {"rnn": "func", "head": ("hooks", 0)}),
    ("resnet_32x32", resnet, CLS, lambda: ([image_data(4, 1)], [image_data(2, 2)]), {"stem": ("hooks", 0), "blocks.2.skip": ("hooks", 0), "bn": "func"}),
    ("called_twice", lambda: seeded(CalledTwice), CLS, lambda: ([(torch.randn(5, 4, dtype=DT), torch.tensor([0, 1, 2, 0, 1]))], [(torch.randn(2, 4, dtype=DT), torch.tensor([2, 0]))]), {"shared": ("hooks", 0)}),
]
IDS = [c[0] for c in CASES]


def oracle_grads(model, task, batches, objective):
    fn = task.loss if objective == "loss" else task.measurement
    return torch.cat([loop_grads(model, fn, b) for b in batches])


def fit_quietly(est, model, train):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # vmap's loop fallback on HF/RNN models
        warnings.simplefilter("ignore", UserWarning)
        return est.fit(model, train)


@pytest.mark.parametrize("name,build,task,data,expected", CASES, ids=IDS)
def test_identity_scores_equal_the_autograd_loop(name, build, task, data, expected):
    model = build()
    train, test = data()
    est = fit_quietly(InfluenceEstimator(Identity(), task), model, train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = est.pairwise_scores(test)
        self_scores = est.self_scores()
    G_train = oracle_grads(model, task, train, "loss")
    G_test = oracle_grads(model, task, test, "measurement")
    ref = G_test @ G_train.T
    assert float((scores.double() - ref).norm()) <= 1e-5 * float(ref.norm()), name
    torch.testing.assert_close(scores.double(), ref, rtol=1e-5, atol=1e-7 * float(ref.abs().max()))
    torch.testing.assert_close(self_scores.double(), G_train.pow(2).sum(1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name,build,task,data,expected", CASES, ids=IDS)
def test_gradient_coverage_is_honest(name, build, task, data, expected):
    model = build()
    train, _ = data()
    est = fit_quietly(InfluenceEstimator(Identity(), task), model, train)
    coverage = est.gradient_coverage_
    names = {p for entry in coverage.values() for p in entry["parameters"]}
    assert names == set(est.layout_.names)  # every attributed parameter once
    assert sum(e["num_params"] for e in coverage.values()) == est.layout_.num_params
    for module, want in expected.items():
        path, axis, tie = (want, None, None) if isinstance(want, str) else (*want, None)[:3]
        assert coverage[module]["path"] == path, (module, coverage[module])
        if path == "hooks":
            assert coverage[module]["batch_axis"] == axis, (module, coverage[module])
            assert coverage[module]["reason"] == tie, (module, coverage[module])
        else:
            assert coverage[module]["reason"], module
    for module, entry in coverage.items():
        if module in ("transformer.wte", "wte", "emb") and entry["path"] == "func" and "tie" in name + "gpt2nanogpt":
            assert "tied or functional use" in entry["reason"]


@pytest.mark.parametrize("name,build,task,data,expected", CASES, ids=IDS)
def test_ekfac_coverage_is_honest(name, build, task, data, expected):
    """EK-FAC's coverage_ agrees with the gradient plan: a Kronecker block exactly for the
    Linear/Conv2d/Embedding/Conv1D layers the hook path computes (on whatever batch axis), the
    fallback with the plan's reason for the others (functional use, no batch axis), and the
    fallback naming the tie for a tied weight (summed on the hook path, no Kronecker block)."""
    model = build()
    train, test = data()
    est = fit_quietly(InfluenceEstimator(EKFAC(damping=1e-2, fisher_type="empirical"), task), model, train)
    coverage, plan = est.curvature_.coverage_, est.gradient_coverage_
    assert {p for e in coverage.values() for p in e["parameters"]} == set(est.layout_.names)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    for module, entry in plan.items():
        kronecker_kind = kinds.get(module) in ("Linear", "Conv2d", "Embedding", "Conv1D")
        if not kronecker_kind or module not in coverage:
            continue
        if entry["path"] == "hooks" and entry["reason"]:  # a tie: summed gradients, no block
            assert coverage[module]["method"] != "kronecker", (module, coverage[module])
            assert coverage[module]["reason"].startswith("weight tied with "), (module, coverage[module])
        elif entry["path"] == "hooks":
            assert coverage[module]["method"] == "kronecker", (module, coverage[module])
        else:
            assert coverage[module]["method"] != "kronecker", (module, coverage[module])
            assert coverage[module]["reason"] == entry["reason"], (module, coverage[module], entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = est.pairwise_scores(test)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("B", [6, 4])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_sequence_first_equals_its_batch_first_twin(B, curvature):
    """K-FAC/EK-FAC on PyTorch's default sequence-first layers give the scores of the
    batch-first twin with the same weights, also when the batch size equals the sequence
    length (there the batch axis was once inferred from a shape equality)."""
    from influence import KFAC

    cls = {"kfac": KFAC, "ekfac": EKFAC}[curvature]
    first, second = seeded(Encoder, True), seeded(Encoder, False)
    second.load_state_dict(first.state_dict())
    train, test = seq_data(B, 6)
    results = []
    for model in (first, second):
        est = fit_quietly(InfluenceEstimator(cls(damping=1e-2, fisher_type="empirical"), CLS), model, train)
        results.append(est.pairwise_scores(test))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-8)


class BatchMixer(nn.Module):
    """Mixes examples across the batch before a Linear (a hand-made batch statistic): the use
    and axis probes see nothing wrong; only the self-check can tell that the hook path's
    gradients (in-batch context) differ from the per-example definition (each example alone)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = x + x.mean(0, keepdim=True)
        return self.head(torch.tanh(self.fc(x)))


def test_self_check_falls_back_with_a_warning_naming_the_layer():
    model = seeded(BatchMixer)
    g = torch.Generator().manual_seed(0)
    train = [(torch.randn(5, 4, generator=g, dtype=DT), torch.tensor([0, 1, 2, 0, 1]))]
    with pytest.warns(FallbackWarning, match=r"Self-check: .*'fc' \(off by .*\).* torch.func"):
        est = InfluenceEstimator(Identity(), CLS).fit(model, train)
    coverage = est.gradient_coverage_
    assert coverage["fc"]["path"] == "func" and "self-check" in coverage["fc"]["reason"]
    ref = oracle_grads(model, CLS, [(x[i : i + 1], y[i : i + 1]) for x, y in train for i in range(5)], "loss")
    torch.testing.assert_close(est.self_scores().double(), ref.pow(2).sum(1), rtol=1e-6, atol=1e-9)
    # without the self-check the mixing goes unnoticed: this is what the check is for
    est = InfluenceEstimator(Identity(), CLS, self_check=False).fit(model, train)
    assert est.gradient_coverage_["fc"]["path"] == "hooks"


@pytest.mark.parametrize("name,build,task,data,expected", CASES, ids=IDS)
def test_cg_with_its_defaults_solves_on_every_model(name, build, task, data, expected):
    """CG() at its defaults (GGN, damping 1e-3, 100 iterations) runs on every zoo model (sdpa,
    fused encoder and RNN kernels included). Its answer is honest: the preconditioned queries
    satisfy the exact system to its tolerance, or a ConvergenceWarning said they do not."""
    from influence import CG
    from influence.exceptions import ConvergenceWarning

    model = build()
    train, test = data()
    est = fit_quietly(InfluenceEstimator(CG(), task), model, train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = est.pairwise_scores(test)
    G = torch.cat([est._computer().flat(b, "measurement") for b in test])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        residual = float(est.curvature_.residual(G).max())
    assert torch.isfinite(scores).all()
    warned = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert residual < 1e-4 or warned, (name, residual)
