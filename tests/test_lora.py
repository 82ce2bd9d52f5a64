"""LoRA wrapper: adapters only are trainable, B starts at zero, merge/unmerge agree, and the
LoRA LM's per-example gradients match a loop of autograd in float64."""

import pytest
import torch
from oracles import loop_grads
from zoo import DT, lm_batch, tiny_lm

from influence import LanguageModelingTask, per_sample_grads
from influence.lm import LORA_PARAMS, LoRALinear, apply_lora, lora_layers, merge_lora, unmerge_lora
from influence.params import select_parameters


def lora_lm(seed=0, dropout=0.0):
    model = apply_lora(tiny_lm(seed), r=2, alpha=8, dropout=dropout)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B so that both adapter factors matter
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.3)
    return model.eval()


def test_targets_q_and_v_of_every_layer():
    model = apply_lora(tiny_lm(), r=2)
    assert sorted(lora_layers(model)) == [
        "blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"
    ]
    assert all(isinstance(m.lora_A, torch.nn.Linear) for m in lora_layers(model).values())


def test_wrapped_model_equals_base_at_init():
    base = tiny_lm()
    batch = lm_batch()
    expected = base(batch["input_ids"], batch["attention_mask"])
    model = apply_lora(base, r=2, alpha=8).eval()
    assert torch.equal(model(batch["input_ids"], batch["attention_mask"]), expected)


def test_only_adapters_receive_gradients():
    model = lora_lm()
    loss = LanguageModelingTask().loss(model, lm_batch(labels=True)).sum()
    loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    layout = select_parameters(model, "trainable")
    assert layout == select_parameters(model, LORA_PARAMS)


def test_merge_unmerge_agree():
    model = lora_lm()
    batch = lm_batch()
    before = model(batch["input_ids"], batch["attention_mask"])
    weights = [m.base.weight.clone() for m in lora_layers(model).values()]
    merge_lora(model)
    merged = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(merged, before)
    merge_lora(model)  # idempotent
    torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), before)
    unmerge_lora(model)
    for w, m in zip(weights, lora_layers(model).values()):
        torch.testing.assert_close(m.base.weight, w)
    torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), before)


def test_lora_per_example_grads_match_loop_oracle():
    model = lora_lm()
    task = LanguageModelingTask()
    batch = lm_batch(n=5, labels=True)
    layout = select_parameters(model, LORA_PARAMS)
    G = per_sample_grads(model, task, batch, LORA_PARAMS)
    expected = loop_grads(model, task.loss, batch, list(layout.names))
    assert G.dtype == DT
    torch.testing.assert_close(G, expected, rtol=1e-9, atol=1e-11)


def test_dropout_only_in_training_mode():
    model = lora_lm(dropout=0.5)
    batch = lm_batch()
    model.eval()
    a = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), a)
    model.train()
    assert not torch.allclose(model(batch["input_ids"], batch["attention_mask"]), a)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="matched no nn.Linear.*blocks.0.attn.q"):
        apply_lora(tiny_lm(), targets="*.query")
    with pytest.raises(ValueError, match="positive integer"):
        LoRALinear(torch.nn.Linear(2, 2), r=0)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(torch.nn.Conv1d(2, 2, 1))


def test_peft_path_is_guarded():
    try:
        import peft  # noqa: F401
    except ImportError:
        from influence.lm import apply_peft_lora

        with pytest.raises(ImportError, match="optional dependency peft"):
            apply_peft_lora(tiny_lm())
        return
    from influence.lm import apply_peft_lora

    model = apply_peft_lora(tiny_lm(), r=2, alpha=8, dropout=0.0).eval()
    batch = lm_batch(labels=True)
    layout = select_parameters(model, LORA_PARAMS)
    assert layout.num_params == 2 * 2 * (2 * 8 + 8 * 2)
    G = per_sample_grads(model, LanguageModelingTask(), batch, LORA_PARAMS)
    assert G.shape == (4, layout.num_params)


def test_hook_path_covers_the_adapters():
    """lora_A / lora_B are plain nn.Linear: the layer-capture path (K-FAC, fast per-example
    gradients) sees them and reproduces the loop oracle."""
    from influence.gradients.capture import LayerCapture, layer_grads, supported_layers

    model = lora_lm()
    task = LanguageModelingTask()
    batch = lm_batch(n=3, labels=True)
    layout = select_parameters(model, LORA_PARAMS)
    layers = supported_layers(model, layout)
    assert sorted(layers) == sorted(
        f"{name}.lora_{ab}" for name in lora_layers(model) for ab in "AB"
    )
    with LayerCapture(layers, batch_size=3) as cap:
        cap.backward(task.loss(model, batch))
    grads = {}
    for name, info in layers.items():
        grads.update(layer_grads(info, cap.inputs[name], cap.output_grads[name]))
    G = layout.flatten(grads, batch_dims=1)
    expected = loop_grads(model, task.loss, batch, list(layout.names))
    torch.testing.assert_close(G, expected, rtol=1e-9, atol=1e-11)
