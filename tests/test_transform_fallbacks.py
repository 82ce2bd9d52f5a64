"""What happens when torch.func cannot run a model: fallbacks, their numbers and their warnings."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import oracles
import zoo
from influence import (
    CG,
    ClassificationTask,
    CurvatureError,
    Exact,
    FallbackWarning,
    LanguageModelingTask,
    per_sample_grads,
)
from influence.curvature._operator import CurvatureOperator
from influence.params import select_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class OldStyleTanh(torch.autograd.Function):
    """tanh as a legacy autograd.Function: no setup_context and no jvp, so torch.func transforms
    refuse it, while plain autograd (and double backward: the backward is built of torch ops)
    works."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class FirstOrderTanh(OldStyleTanh):
    """The same with a backward that cannot itself be differentiated."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class CustomActivationMLP(nn.Module):
    def __init__(self, function=OldStyleTanh):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.function = nn.Linear(4, 5), nn.Linear(5, 3), function

    def forward(self, x):
        return self.fc2(self.function.apply(self.fc1(x)))


ORACLES = {"hessian": oracles.dense_hessian, "ggn": oracles.dense_ggn}


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_products_fall_back_to_double_backward_once_and_stay_exact(kind):
    model = CustomActivationMLP().double().eval()
    loader = [zoo.classification_data(n=6)]
    task, layout = ClassificationTask(), select_parameters(model)
    dense = ORACLES[kind](model, task, loader)
    V = torch.randn(4, layout.num_params, generator=torch.Generator().manual_seed(0), dtype=zoo.DT)
    op = CurvatureOperator(kind, model, task, layout, loader)
    with pytest.warns(FallbackWarning, match=r"use reverse-over-reverse autograd .*jvp\) fails in module <root> "
                      r"\(CustomActivationMLP\) because a custom torch\.autograd\.Function does not support "
                      r"torch\.func transforms\. Results are the same.*setup_context") as record:
        first = op.matmat(V)
    assert len([w for w in record if w.category is FallbackWarning]) == 1
    torch.testing.assert_close(first, V @ dense, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():  # remembered per model: no second warning, same numbers
        warnings.simplefilter("error")
        torch.testing.assert_close(op.matmat(V), first, rtol=0, atol=0)


def test_cg_with_defaults_on_the_fallback_equals_exact():
    model = CustomActivationMLP().double().eval()
    loader, task = [zoo.classification_data(n=6)], ClassificationTask()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        exact = Exact(damping=0.1).fit(model, task, loader)
        cg = CG(damping=0.1, rtol=1e-12).fit(model, task, loader)
        G = torch.randn(2, exact.num_params_, dtype=zoo.DT)
        torch.testing.assert_close(cg.solve(G), exact.solve(G), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(exact.matrix_, oracles.dense_ggn(model, task, loader), rtol=1e-10, atol=1e-12)


def test_no_second_order_mode_names_the_fix():
    model = CustomActivationMLP(FirstOrderTanh).double().eval()
    loader, task = [zoo.classification_data(n=6)], ClassificationTask()
    with pytest.raises(CurvatureError, match=r"Cannot compute 'ggn'-vector products on this CustomActivationMLP: "
                       r"forward-mode AD \(torch\.func\.jvp\) fails in module <root> \(CustomActivationMLP\) .*and "
                       r"reverse-over-reverse autograd \(double backward\) fails too \(double "
                       r"backward gives a non-symmetric curvature .*@once_differentiable.*Fix: .*setup_context.*"
                       r"curvature_type='fisher'"):
        Exact(damping=0.1).fit(model, task, loader)
    with warnings.catch_warnings():  # the suggested fix works: first-order gradients only
        warnings.simplefilter("ignore", FallbackWarning)
        fisher = Exact(damping=0.1, curvature_type="fisher").fit(model, task, loader)
    torch.testing.assert_close(fisher.matrix_, oracles.dense_fisher(model, task, loader), rtol=1e-10, atol=1e-12)


def _tiny_gpt2(attn):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=16,
                                     bos_token_id=1, eos_token_id=1, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_vmap_loop_fallback_warning_is_a_complete_sentence_with_the_fix():
    model = _tiny_gpt2("sdpa")
    task, batch = LanguageModelingTask(), zoo.lm_batch(n=3, T=6, vocab=13)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        G = per_sample_grads(model, task, batch)
    ours = [str(w.message) for w in record if w.category is FallbackWarning]
    assert len(ours) == 1, ours
    (message,) = ours
    assert message.startswith("Per-example gradients of this GPT2LMHeadModel fall back to a loop")
    assert "cannot run module transformer (GPT2Model) because it reads tensor values in Python" in message
    assert 'attn_implementation="eager"' in message and message.endswith("(Reported once per model.)")
    assert "For (1)" not in message  # torch's text is not quoted, let alone cut off
    torch.testing.assert_close(G, oracles.loop_grads(model, task.loss, batch), rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_sample_grads(model, task, batch)
    eager = _tiny_gpt2("eager")  # the suggested fix: vmap runs, nothing to report
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        torch.testing.assert_close(per_sample_grads(eager, task, batch), G, rtol=1e-10, atol=1e-12)


def test_missing_batching_rules_are_reported_once_in_our_words():
    """torch warns "performance drop ... batching rule for aten::mkldnn_rnn_layer" on every call
    with the float32 LSTM on the CPU; we report it once per model, with the fix."""
    torch.manual_seed(0)
    model = nn.LSTM(4, 3, batch_first=True).eval()

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = model, nn.Linear(3, 2)

        def forward(self, x):
            warnings.warn("the model's own warning", UserWarning)  # must still reach the user
            return self.head(self.lstm(x)[0][:, -1])

    net = Last().eval()
    batch = (torch.randn(3, 5, 4), torch.tensor([0, 1, 1]))
    for call in range(2):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            G = per_sample_grads(net, ClassificationTask(), batch)
        texts = [(w.category, str(w.message)) for w in record]
        assert not any("performance drop" in t for _, t in texts), texts
        assert (UserWarning, "the model's own warning") in texts
        ours = [t for c, t in texts if c is FallbackWarning]
        if call == 0:
            assert len(ours) == 1 and "no batching rule for aten::mkldnn_rnn_layer" in ours[0]
            assert "torch.backends.mkldnn.flags(enabled=False)" in ours[0]
        else:
            assert ours == []
    torch.testing.assert_close(G, oracles.loop_grads(net, ClassificationTask().loss, batch), rtol=1e-4, atol=1e-6)
