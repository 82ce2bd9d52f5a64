"""Curvature products and iterative solvers on standard architectures, with their defaults.

The zoo: stock HuggingFace GPT-2 (``attn_implementation`` "sdpa" and "eager") and Llama (sdpa,
grouped-query attention), ``nn.TransformerEncoderLayer`` (batch_first True: the eval-mode fast
path; False), ``nn.LSTM`` in float32 (the oneDNN kernel on the CPU), ``nn.GRU`` and a small CNN.
Tiny sizes, random weights, nothing downloaded. Every product is checked against
:func:`oracles.double_backward_products`: plain reverse-mode autograd on the model's own
parameters, through the eager attention twin (HuggingFace) or torch's math attention (fused
attention kernels have no double backward), in float64.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import oracles
import zoo
from influence import CG, Arnoldi, ClassificationTask, Exact, LanguageModelingTask, LiSSA, select_parameters
from influence.curvature._operator import CurvatureOperator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 64


class SequenceClassifier(nn.Module):
    """``(B, T, 8)`` sequences → a sequence model → mean over time → 3 logits."""

    def __init__(self, kind: str, batch_first: bool = True):
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        if kind == "encoder":
            self.core = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        else:
            self.core = getattr(nn, kind.upper())(8, 6, batch_first=True)
        self.head = nn.Linear(8 if kind == "encoder" else 6, 3)

    def forward(self, x):
        if self.kind == "encoder":
            h = self.core(x) if self.batch_first else self.core(x.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.core(x)[0]
        return self.head(h.mean(1))


class Case:
    """A model, its task and batch, and how to compute the reference products."""

    def __init__(self, model, task, batch, reference_model=None, reference_context=None, rtol=1e-9):
        self.model, self.task, self.batch, self.rtol = model, task, batch, rtol
        self.reference_model = reference_model if reference_model is not None else model
        self.reference_context = reference_context or contextlib.nullcontext
        self.layout = select_parameters(model)

    def reference(self, V, kind="ggn", names=None):
        """Mean curvature products ``C V`` (float64) by double-backward autograd."""
        ref = self.reference_model
        batch = self.batch
        if ref is not self.model and next(ref.parameters()).dtype != next(self.model.parameters()).dtype:
            batch = tuple(t.to(torch.float64) if t.is_floating_point() else t for t in batch)
        with self.reference_context():
            out = oracles.double_backward_products(ref, self.task, batch, V.double(), kind, names or self.layout.names)
        return out / self.task.num_examples(self.batch)


def _hf(name: str, attn: str | None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, **common)
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=16, **common,
        )
        cls = transformers.LlamaForCausalLM
    kwargs = {} if attn is None else {"attn_implementation": attn}
    model = cls._from_config(copy.deepcopy(config), **kwargs).double().eval()
    twin = cls._from_config(copy.deepcopy(config), attn_implementation="eager").double().eval()
    twin.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == (attn or "sdpa")  # sdpa is the default
    assert twin.config._attn_implementation == "eager"
    batch = zoo.lm_batch(n=3, T=8, vocab=VOCAB, labels=True)
    # Llama's RMSNorm computes in float32 even in a float64 model
    return Case(model, LanguageModelingTask(), batch, reference_model=twin, rtol=1e-5 if name == "llama" else 1e-9)


def _sequence(kind: str, batch_first: bool = True, dtype=torch.float64):
    torch.manual_seed(0)
    model = SequenceClassifier(kind, batch_first).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(5, 6, 8, generator=g).to(dtype), torch.randint(0, 3, (5,), generator=g))
    if dtype == torch.float64:
        math = (lambda: sdpa_kernel(SDPBackend.MATH)) if kind == "encoder" else None
        return Case(model, ClassificationTask(), batch, reference_context=math)
    return Case(model, ClassificationTask(), batch, reference_model=copy.deepcopy(model).double(), rtol=1e-4)


def _cnn():
    x, y = zoo.image_data(n=4)
    return Case(zoo.cnn(), ClassificationTask(), (x, y))


ZOO = {
    "gpt2-sdpa": lambda: _hf("gpt2", "sdpa"),
    "gpt2-eager": lambda: _hf("gpt2", "eager"),
    "llama-default-sdpa": lambda: _hf("llama", None),
    "encoder-batch-first": lambda: _sequence("encoder", batch_first=True),
    "encoder-seq-first": lambda: _sequence("encoder", batch_first=False),
    "lstm-float32": lambda: _sequence("lstm", dtype=torch.float32),
    "gru": lambda: _sequence("gru"),
    "cnn": _cnn,
}
HF = {"gpt2-sdpa", "gpt2-eager", "llama-default-sdpa"}
CASES = [pytest.param(name, marks=pytest.mark.slow) if name in HF else name for name in ZOO]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def cases():
    return {}


def get(cases, name) -> Case:
    if name not in cases:
        cases[name] = ZOO[name]()
    return cases[name]


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("name", CASES)
def test_products_match_double_backward(cases, name, kind):
    case = get(cases, name)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(3, case.layout.num_params, generator=g, dtype=torch.float64)
    op = CurvatureOperator(kind, case.model, case.task, case.layout, [case.batch])
    product = op.matmat(V.to(next(case.model.parameters()).dtype))
    assert rel(product, case.reference(V, kind)) < case.rtol


@pytest.mark.parametrize("name", CASES)
def test_cg_lissa_arnoldi_with_defaults(cases, name):
    """Default curvature_type (GGN), preconditioner, scale and variant; the damping is set
    relative to the top eigenvalue so that the solves converge in a few products."""
    case = get(cases, name)
    model, task, loader, P = case.model, case.task, [case.batch], case.layout.num_params
    dtype = next(model.parameters()).dtype
    G = torch.randn(2, P, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)

    lissa = LiSSA(depth=20, power_iters=5).fit(model, task, loader)
    assert lissa.curvature_type == "ggn" and lissa.top_eigenvalue_ > 0
    lam = 3 * lissa.top_eigenvalue_

    def residual(X):  # ‖(C + λI) x − g‖ / ‖g‖ with the reference C, per row
        R = case.reference(X.double()) + lam * X.double() - G.double()
        return R.norm(dim=1) / G.double().norm(dim=1)

    tol = max(case.rtol, 1e-8) * 10
    assert float(residual(lissa.solve(G, damping=lam)).max()) < tol

    cg = CG(damping=lam, rtol=1e-10).fit(model, task, loader)
    X = cg.solve(G)
    assert bool(cg.last_info_.converged.all()) and int(cg.last_info_.iterations.max()) <= 15
    assert float(residual(X).max()) < tol

    arnoldi = Arnoldi(rank=3).fit(model, task, loader)
    U, mu = arnoldi.eigenvectors_, arnoldi.eigenvalues_
    rayleigh = (U.T * case.reference(U.T)).sum(1)  # uᵢᵀ C uᵢ = μᵢ for the Ritz pairs
    torch.testing.assert_close(rayleigh, mu.double(), rtol=tol, atol=tol * float(mu.abs().max()))
    assert float(mu.min()) > -1e-6 * float(mu.max())  # the GGN is positive semi-definite
    assert torch.isfinite(arnoldi.solve(G, damping=lam)).all()


SMALL = {  # Exact's dense matrix: all parameters, or the final norm of the LMs
    "gpt2-sdpa": ["transformer.ln_f"],
    "llama-default-sdpa": ["model.norm"],
    "encoder-batch-first": None,
    "lstm-float32": None,
    "gru": None,
    "cnn": None,
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HF else n for n in SMALL])
def test_exact_ggn_matrix_matches_double_backward(cases, name):
    case = get(cases, name)
    params = SMALL[name] or "trainable"
    exact = Exact(damping=0.1, curvature_type="ggn").fit(case.model, case.task, [case.batch], params=params)
    names = exact.layout_.names
    V = torch.randn(2, exact.num_params_, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert rel(V @ exact.matrix_, case.reference(V, "ggn", names)) < case.rtol
