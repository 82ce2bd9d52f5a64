"""Silent wrong results of the estimator (issue 13, items 10, 11, 13, 14): every scoring path
checks finiteness and names the right examples, queries with nothing measured are reported,
a failed refit leaves the previous fit intact, and any change to the model after ``fit``
(not only to the attributed parameters) is detected and named."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import zoo
from influence import (
    EKFAC,
    DataInf,
    Exact,
    Identity,
    InfluenceEstimator,
    LanguageModelingTask,
    LiSSA,
    ModelChangedError,
    NonFiniteGradientError,
    NotFittedError,
    RegressionTask,
)


# ------------------------------------------------------------------- item 10: non-finite
@pytest.fixture()
def nan_train():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=20)
    x[13, 0] = float("nan")
    return model, zoo.batches(x, y, 10), [zoo.classification_data(n=5, seed=1)]


def test_identity_ghost_self_scores_name_the_nan_example(nan_train):
    model, train, test = nan_train
    est = InfluenceEstimator(Identity()).fit(model, train)
    for score in (est.self_scores, lambda: est.pairwise_scores(test), lambda: est.top_k(test, 2)):
        with pytest.raises(NonFiniteGradientError, match=r"1 train example\(s\) at indices \[13\]"):
            score()


@pytest.mark.parametrize("curvature", [DataInf(), LiSSA(damping="datainf", variant="paper")], ids=["DataInf", "LiSSA-paper"])
def test_nan_training_example_is_named_at_fit_not_blamed_on_queries(nan_train, curvature):
    model, train, _ = nan_train
    with pytest.raises(NonFiniteGradientError, match=r"1 train example\(s\) at indices \[13\]"):
        InfluenceEstimator(curvature).fit(model, train)


# ------------------------------------------------------------------- item 11: nothing measured
@pytest.fixture(scope="module")
def lm():
    model = zoo.tiny_lm()
    train = zoo.dict_batches(zoo.lm_batch(n=6, seed=0, labels=True), 3)
    queries = zoo.lm_batch(n=3, seed=1, labels=True)
    est = InfluenceEstimator(EKFAC(damping=1e-2, fisher_type="empirical"), LanguageModelingTask())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K-FAC's fallback for the LayerNorms
        est.fit(model, train)
    return est, train, queries


def _relabel(batch, rows):
    out = {k: v.clone() for k, v in batch.items()}
    out["labels"][rows] = -100
    return out


def test_queries_with_no_measured_token_raise_when_all_are_empty(lm):
    est, _, queries = lm
    empty = [_relabel(queries, slice(None))]
    calls = {"pairwise_scores": lambda: est.pairwise_scores(empty), "top_k": lambda: est.top_k(empty, 2),
             "influence_factors": lambda: est.influence_factors(empty)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"All 3 test example\(s\) have a zero gradient .*labels are all -100"):
            call()


def test_a_query_with_no_measured_token_is_named(lm):
    est, _, queries = lm
    some = [_relabel(queries, 1)]
    full = est.pairwise_scores([queries])
    for name, call in {"pairwise_scores": lambda: est.pairwise_scores(some), "top_k": lambda: est.top_k(some, 2)[0],
                       "influence_factors": lambda: est.influence_factors(some)}.items():
        with pytest.warns(UserWarning, match=r"1 of 3 test example\(s\) at indices \[1\] have a zero gradient"):
            rows = call()
        assert bool((rows[1] == 0).all()), name
        assert not bool((rows[0] == 0).all()), name
    with pytest.warns(UserWarning, match="at indices \\[1\\]"):
        torch.testing.assert_close(est.pairwise_scores(some)[[0, 2]], full[[0, 2]])


def test_padding_only_query_and_empty_training_examples_are_named(lm):
    est, train, queries = lm
    padded = {k: v.clone() for k, v in queries.items() if k != "labels"}
    padded["attention_mask"][2, 1:] = 0  # one token: nothing left to predict
    with pytest.warns(UserWarning, match=r"1 of 3 test example\(s\) at indices \[2\]"):
        est.pairwise_scores([padded])
    with pytest.warns(UserWarning, match=r"2 of 6 train example\(s\) at indices \[1, 3\] have a zero gradient"):
        scores = est.self_scores([_relabel(train[0], 1), _relabel(train[1], 0)])
    assert scores[1] == 0 and scores[3] == 0 and bool((scores[[0, 2, 4, 5]] > 0).all())


def test_zero_gradient_backstop_for_tasks_that_cannot_tell():
    """RegressionTask cannot say which examples are empty; a query fitted exactly has a zero
    gradient and is reported from the gradient itself."""
    model = nn.Linear(2, 1).to(zoo.DT)
    x = torch.randn(4, 2, dtype=zoo.DT)
    with torch.no_grad():
        y = model(x)[:, 0]
    train = [(torch.randn(6, 2, dtype=zoo.DT), torch.randn(6, dtype=zoo.DT))]
    est = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), RegressionTask()).fit(model, train)
    y_off = y.clone()
    y_off[[0, 2]] += 1.0
    with pytest.warns(UserWarning, match=r"2 of 4 test example\(s\) at indices \[1, 3\]"):
        est.influence_factors([(x, y_off)])
    with pytest.raises(ValueError, match=r"All 4 test example\(s\) have a zero gradient"):
        est.influence_factors([(x, y)])


# ------------------------------------------------------------------- item 13: failed refit
class _FailingLoader:
    """Yields its first batch, then fails (a disk error half-way through a fit)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield self.batches[0]
        raise RuntimeError("disk error while reading batch 1")


@pytest.mark.parametrize("curvature", [EKFAC(damping=1e-2), Exact(damping=0.1, curvature_type="ggn")], ids=["EKFAC", "Exact"])
def test_failed_refit_leaves_the_previous_fit(curvature):
    model = zoo.mlp()
    train = zoo.batches(*zoo.classification_data(n=12), 6)
    est = InfluenceEstimator(curvature).fit(model, train)
    before = est.pairwise_scores(train)
    state = {k: v for k, v in vars(est).items() if k.endswith("_")}
    est.set_params(params=["2"])  # a new layout, as the refit had
    with pytest.raises(RuntimeError, match="disk error"):
        est.fit(model, _FailingLoader(train))
    assert {k: v for k, v in vars(est).items() if k.endswith("_")} == state
    assert torch.equal(est.pairwise_scores(train), before)


def test_failed_first_fit_leaves_the_estimator_unfitted():
    est = InfluenceEstimator(EKFAC(damping=1e-2))
    with pytest.raises(RuntimeError, match="disk error"):
        est.fit(zoo.mlp(), _FailingLoader(zoo.batches(*zoo.classification_data(n=12), 6)))
    assert not any(k.endswith("_") and not k.startswith("_") for k in vars(est))
    with pytest.raises(NotFittedError, match="call fit"):
        est.self_scores()


# ------------------------------------------------------------------- item 14: model changes
def _fitted_cnn(params):
    model = zoo.cnn()
    data = [zoo.image_data(n=4)]
    est = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), params=params).fit(model, data)
    return model, data, est


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda m: m.conv1.weight.mul_(1.5), r"values of other parameters and buffers .*\['conv1.weight'\]"),
        (lambda m: m.bn.running_mean.add_(0.5), r"values of other parameters and buffers .*\['bn.running_mean'\]"),
        (lambda m: m.fc.bias[0].add_(0.5), r"values of attributed parameters \['fc.bias'\]"),
    ],
    ids=["unattributed-weight", "batchnorm-statistics", "attributed-bias"],
)
def test_changes_after_fit_are_detected_and_named(change, named):
    model, data, est = _fitted_cnn(["fc"])
    before = est.pairwise_scores(data)
    with torch.no_grad():
        change(model)
    with pytest.raises(ModelChangedError, match=rf"The model changed after fit\(\): {named}.*Call fit"):
        est.pairwise_scores(data)
    with pytest.raises(ModelChangedError):
        est.self_scores()
    refit = est.fit(model, data).pairwise_scores(data)
    assert not torch.allclose(refit, before)  # the change did move the scores


def test_swapped_activation_is_detected():
    model = zoo.mlp()
    data = [zoo.classification_data()]
    est = InfluenceEstimator(Identity(), params=["2"]).fit(model, data)
    model[1] = nn.ReLU()
    with pytest.raises(ModelChangedError, match=r"module '1' is now torch.nn.modules.activation.ReLU\(\) \(was torch.nn.modules.activation.Tanh\(\)\)"):
        est.top_k(data, 2)
    model[1] = nn.Tanh()  # back as it was
    est.top_k(data, 2)


def test_mode_and_requires_grad_toggles_and_caches_are_not_changes():
    model, data, est = _fitted_cnn(["fc"])
    before = est.pairwise_scores(data)
    model.train()
    model.eval()
    model.conv1.requires_grad_(False)
    model.register_buffer("cache", torch.zeros(3, dtype=zoo.DT), persistent=False)
    est.pairwise_scores(data)  # a non-persistent buffer (a cache) may come and change
    model.cache.add_(1.0)
    assert torch.equal(est.pairwise_scores(data), before)


def test_loaded_estimator_detects_later_changes(tmp_path):
    model, data, est = _fitted_cnn(["fc"])
    est.save(tmp_path / "est.safetensors")
    loaded = InfluenceEstimator.load(tmp_path / "est.safetensors", model)
    torch.testing.assert_close(loaded.pairwise_scores(data, data), est.pairwise_scores(data))
    with torch.no_grad():
        model.bn.running_var.mul_(2)
    with pytest.raises(ModelChangedError, match=r"bn.running_var"):
        loaded.pairwise_scores(data, data)
