import pytest
import torch
import torch.nn.functional as F

import influence
from influence import BatchFormatError, ClassificationTask, LanguageModelingTask, RegressionTask

import zoo


def test_classification_reads_tuples_and_dicts():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=5)
    expected = F.cross_entropy(model(x), y, reduction="none")
    task = ClassificationTask()
    assert torch.allclose(task.loss(model, (x, y)), expected)
    assert torch.allclose(task.loss(model, {"inputs": x, "labels": y}), expected)
    custom = ClassificationTask(input_key="a", target_key="b")
    assert torch.allclose(custom.loss(model, {"a": x, "b": y}), expected)


def test_classification_margin_measurement_sign():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=5)
    m = ClassificationTask(measurement="margin").measurement(model, (x, y))
    logits = model(x)
    for i in range(5):
        others = torch.cat([logits[i, : y[i]], logits[i, y[i] + 1 :]])
        assert torch.isclose(m[i], -(logits[i, y[i]] - torch.logsumexp(others, 0)))
    with pytest.raises(ValueError, match=r"Invalid measurement 'acc'. Supported: \('loss', 'margin'\)"):
        ClassificationTask(measurement="acc")


@pytest.mark.parametrize("batch", ["text", (torch.zeros(2, 4),), {"x": torch.zeros(2, 4)}])
def test_unreadable_batches_raise(batch):
    with pytest.raises(BatchFormatError, match="could not read"):
        ClassificationTask().loss(zoo.mlp(), batch)


def test_regression_is_half_squared_error():
    model = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    loss = RegressionTask().loss(model, (x, y))
    assert torch.allclose(loss, 0.5 * ((model(x) - y) ** 2).sum(1))


def test_language_modeling_sums_over_non_padding_targets():
    model = zoo.tiny_lm()
    batch = zoo.lm_batch(n=3, T=6, lengths=[6, 4, 2])
    loss = LanguageModelingTask().loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"])
    for i, L in enumerate([6, 4, 2]):
        ids = batch["input_ids"][i, :L]
        manual = F.cross_entropy(logits[i, : L - 1], ids[1:], reduction="sum")
        assert torch.isclose(loss[i], manual)


def test_language_modeling_respects_labels():
    model = zoo.tiny_lm()
    batch = zoo.lm_batch(n=2, T=6, labels=True)
    loss = LanguageModelingTask().loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"])
    lab = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 13), lab.reshape(-1), ignore_index=-100, reduction="none")
    assert torch.allclose(loss, ce.reshape(2, 5).sum(1))
    with pytest.raises(BatchFormatError, match="expected a dict with 'input_ids'"):
        LanguageModelingTask().loss(model, (batch["input_ids"],))


def test_num_examples_needs_a_tensor():
    with pytest.raises(BatchFormatError, match="could not find a tensor"):
        ClassificationTask().num_examples(["a", "b"])


def test_sample_categorical_draws_softmax_probabilities():
    from influence.tasks import sample_categorical

    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, float("-inf")], [3.0, 0.0, 0.0, 0.0, float("-inf")]])
    n = 100_000
    uniforms = torch.rand(2, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = sample_categorical(logits[:, None].expand(2, n, 5), uniforms)
    assert draws.shape == (2, n)
    assert int((draws == 4).sum()) == 0  # probability zero: never drawn
    freq = torch.stack([torch.bincount(d, minlength=5) for d in draws]).double() / n
    p = torch.softmax(logits.double(), -1)
    # binomial standard error <= 0.0016 at n = 1e5: 4.5 sigma
    torch.testing.assert_close(freq, p, rtol=0, atol=7e-3)
    again = sample_categorical(logits[:, None].expand(2, n, 5), uniforms)
    assert torch.equal(draws, again)  # a function of the uniforms


def test_sample_categorical_one_hot_rows_and_batch_shape():
    from influence.tasks import sample_categorical

    logits = torch.full((3, 7, 6), float("-inf"))
    hot = torch.randint(0, 6, (3, 7), generator=torch.Generator().manual_seed(1))
    logits.scatter_(-1, hot[..., None], 0.0)
    assert torch.equal(sample_categorical(logits, torch.rand(3, 7, generator=torch.Generator().manual_seed(2))), hot)
