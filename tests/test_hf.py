"""HuggingFace causal LMs (GPT-2, Llama; tiny local configs, random weights) and peft LoRA.

Needs ``pip install "transformers>=5" peft``; skipped when they are not importable. Nothing
is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from influence import Exact, FallbackWarning, Identity, InfluenceEstimator, LanguageModelingTask, per_sample_grads  # noqa: E402
from influence.gradients.capture import LayerCapture, layer_grads, supported_layers  # noqa: E402
from influence.params import select_parameters  # noqa: E402
from oracles import loop_grads  # noqa: E402
from zoo import dict_batches, lm_batch  # noqa: E402

VOCAB = 13


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2,
        bos_token_id=1, eos_token_id=1, attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).double().eval()


def capture_grads(model, task, batch, layout):
    """Per-example gradients of the hooked layers from captured inputs and output grads."""
    layers = supported_layers(model, layout, include_transposed=True)
    with LayerCapture(layers, batch_size=task.num_examples(batch)) as cap:
        cap.backward(task.loss(model, batch))
    out = {}
    for name, info in layers.items():
        out.update(layer_grads(info, cap.inputs[name], cap.output_grads[name]))
    return layers, out


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_per_sample_grads_match_the_loop_oracle_with_padding(build):
    model = build()
    task = LanguageModelingTask()
    batch = lm_batch(n=3, T=6, vocab=VOCAB, labels=True)  # right padding, -100 prompt labels
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # vmap runs the HF model directly
        G = per_sample_grads(model, task, batch)
    torch.testing.assert_close(G, loop_grads(model, task.loss, batch), rtol=1e-10, atol=1e-12)


def test_gpt2_conv1d_capture_matches_torch_func():
    model = gpt2()
    task = LanguageModelingTask()
    batch = lm_batch(n=3, T=6, vocab=VOCAB)
    layout = select_parameters(model, ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.*"])
    layers, grads = capture_grads(model, task, batch, layout)
    assert {info.kind for info in layers.values()} == {"conv1d"} and len(layers) == 3
    assert supported_layers(model, layout) == {}  # opt-in: (d_out, d_in) code never sees them
    info = layers["transformer.h.0.attn.c_attn"]
    assert info.transposed and (info.d_in, info.d_out) == (8, 24)
    expected = per_sample_grads(model, task, batch, layout)
    torch.testing.assert_close(layout.flatten(grads, batch_dims=1), expected, rtol=1e-10, atol=1e-12)


def test_scoring_runs_on_gpt2_with_dict_batches():
    model = gpt2()
    data = lm_batch(n=5, T=7, vocab=VOCAB)
    train, test = dict_batches(data, 2), [lm_batch(n=2, T=5, vocab=VOCAB, seed=1)]
    task = LanguageModelingTask()
    ident = InfluenceEstimator(Identity(), task, params=["transformer.h.0.mlp.c_proj"], score_dtype=torch.float64).fit(model, train)
    S = ident.pairwise_scores(test)
    G_test = per_sample_grads(model, task, test[0], ident.layout_, objective="measurement")
    G_train = torch.cat([per_sample_grads(model, task, b, ident.layout_) for b in train])
    torch.testing.assert_close(S, G_test @ G_train.T)
    exact = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), task, params=["transformer.ln_f"], score_dtype=torch.float64).fit(model, train)
    assert exact.pairwise_scores(test).shape == (2, 5) and torch.isfinite(exact.self_scores()).all()


def test_peft_lora_attributes_only_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero: give it values so every gradient is non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model = model.double().eval()
    task = LanguageModelingTask()
    layout = select_parameters(model)  # trainable: the adapters only
    assert layout.names and all("lora_" in n for n in layout.names)
    batch = lm_batch(n=3, T=6, vocab=VOCAB)
    layers, grads = capture_grads(model, task, batch, layout)
    assert sorted(layers) == sorted({n.rpartition(".")[0] for n in layout.names})  # every lora_A/lora_B hooked
    assert all(info.kind == "linear" for info in layers.values())
    expected = per_sample_grads(model, task, batch, layout)
    torch.testing.assert_close(layout.flatten(grads, batch_dims=1), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected, loop_grads(model, task.loss, batch, list(layout.names)), rtol=1e-10, atol=1e-12)

    train = dict_batches(lm_batch(n=4, T=6, vocab=VOCAB, seed=2), 2)
    est = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), task, score_dtype=torch.float64).fit(model, train)
    assert est.curvature_.matrix_.shape == (layout.num_params,) * 2
    assert est.pairwise_scores([batch]).shape == (3, 4)


def test_capture_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, influence, influence.gradients.capture; print('transformers' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
