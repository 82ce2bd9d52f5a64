import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import influence
from influence import (
    BatchFormatError,
    ClassificationTask,
    FallbackWarning,
    InfluenceError,
    LanguageModelingTask,
    per_sample_grads,
)

import oracles
import zoo

ATOL = 1e-10


def check_against_loop(model, task, batch, params="trainable", **kwargs):
    G = per_sample_grads(model, task, batch, params, **kwargs)
    names = list(influence.select_parameters(model, params).names)
    ref = oracles.loop_grads(model, task.loss, batch, names)
    assert G.shape == ref.shape
    assert G.dtype == torch.float64
    torch.testing.assert_close(G, ref, atol=ATOL, rtol=0)
    return G


def test_mlp():
    check_against_loop(zoo.mlp(hidden=(6, 5)), ClassificationTask(), zoo.classification_data())


def test_cnn_with_batchnorm_in_eval_mode():
    check_against_loop(zoo.cnn(), ClassificationTask(), zoo.image_data())


def test_transformer_lm_with_padding():
    G = check_against_loop(zoo.tiny_lm(), LanguageModelingTask(), zoo.lm_batch(n=5, T=8))
    # padding must not change an example's gradient: the same example alone, unpadded
    model, batch = zoo.tiny_lm(), zoo.lm_batch(n=5, T=8)
    L = int(batch["attention_mask"][1].sum())
    alone = {k: v[1:2, :L] for k, v in batch.items()}
    torch.testing.assert_close(per_sample_grads(model, LanguageModelingTask(), alone)[0], G[1], atol=ATOL, rtol=0)


def test_transformer_lm_with_prompt_labels():
    check_against_loop(zoo.tiny_lm(), LanguageModelingTask(), zoo.lm_batch(n=3, labels=True))


def test_frozen_parameters_are_excluded():
    model = zoo.frozen_mlp()
    G = check_against_loop(model, ClassificationTask(), zoo.classification_data())
    assert G.shape[1] == 18
    assert all(p.grad is None for p in model.parameters())


def test_dict_batches_and_measurement_objective():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=4)
    task = ClassificationTask(measurement="margin")
    G = per_sample_grads(model, task, {"x": x, "y": y}, objective="measurement")
    ref = oracles.loop_grads(model, task.measurement, (x, y))
    torch.testing.assert_close(G, ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="Invalid objective 'score'"):
        per_sample_grads(model, task, (x, y), objective="score")


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    batch=st.integers(1, 7),
    chunk=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 1000),
)
def test_random_mlps_batches_and_chunks(widths, batch, chunk, seed):
    model = zoo.mlp(d_in=3, hidden=tuple(widths), d_out=2, seed=seed)
    data = zoo.classification_data(n=batch, d_in=3, classes=2, seed=seed)
    check_against_loop(model, ClassificationTask(), data, chunk_size=chunk)


class DataDependent(nn.Module):
    """Branches on a tensor value: vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


class Gate(nn.Module):
    def forward(self, h):
        if h.sum() > 0:
            return h * 2
        return h


class CountsCalls(nn.Module):
    """Updates a buffer in place during forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


@pytest.mark.parametrize("cls,where", [(DataDependent, "gate"), (CountsCalls, "<root>")])
def test_vmap_failure_falls_back_to_loop_naming_the_module(cls, where):
    torch.manual_seed(0)
    model = cls().double()
    data = zoo.classification_data(n=4, d_in=3, classes=2)
    with pytest.warns(FallbackWarning, match=f"vmap cannot run module {where}"):
        G = per_sample_grads(model, ClassificationTask(), data)
    ref = oracles.loop_grads(model, ClassificationTask().loss, data)
    torch.testing.assert_close(G, ref, atol=ATOL, rtol=0)
    with warnings.catch_warnings():  # remembered: no second warning, still exact
        warnings.simplefilter("error")
        torch.testing.assert_close(per_sample_grads(model, ClassificationTask(), data), ref, atol=ATOL, rtol=0)


def test_batchnorm_in_training_mode_is_refused():
    model = zoo.cnn().train()
    with pytest.raises(InfluenceError, match=r"'bn' \(BatchNorm2d\) is in training mode.*model.eval\(\)"):
        per_sample_grads(model, ClassificationTask(), zoo.image_data())


def test_reducing_task_is_refused():
    class MeanLoss(ClassificationTask):
        def loss(self, model, batch):
            return super().loss(model, batch).mean()

    with pytest.raises(InfluenceError, match=r"one value per example, shape \(B,\)"):
        per_sample_grads(zoo.mlp(), MeanLoss(), zoo.classification_data())


def test_bad_chunk_size_and_batch():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        per_sample_grads(zoo.mlp(), ClassificationTask(), zoo.classification_data(), chunk_size=0)
    with pytest.raises(BatchFormatError, match="could not read"):
        per_sample_grads(zoo.mlp(), ClassificationTask(), [torch.zeros(2, 4)] * 3)


def test_loop_fallback_works_under_no_grad():
    """Curvatures call per_sample_grads under torch.no_grad; the loop must still differentiate."""
    torch.manual_seed(1)
    model = DataDependent().double()
    data = zoo.classification_data(n=3, d_in=3, classes=2)
    with torch.no_grad(), pytest.warns(FallbackWarning):
        G = per_sample_grads(model, ClassificationTask(), data)
    ref = oracles.loop_grads(model, ClassificationTask().loss, data)
    torch.testing.assert_close(G, ref, atol=ATOL, rtol=0)
