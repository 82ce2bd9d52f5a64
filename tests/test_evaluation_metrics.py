"""Evaluation metrics against hand-computed cases, scipy and scikit-learn."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from influence import ClassificationTask, Exact, Identity
from influence.evaluation import (
    cover,
    ihvp_error,
    leave_one_out_correlation,
    linear_datamodeling_score,
    precision_at_k,
    random_subset_masks,
    recall_at_k,
    retrain_on_subsets,
    roc_auc,
    top1_accuracy,
)
from zoo import DT, classification_data


def test_lds_matches_scipy_spearman_per_query():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 8))
    masks = random_subset_masks(8, 12, 0.5, seed=1)
    outputs = rng.normal(size=(12, 3))
    result = linear_datamodeling_score(scores, masks, outputs, n_bootstrap=200)
    expected = [spearmanr(masks @ scores[i], -outputs[:, i])[0] for i in range(3)]
    np.testing.assert_allclose(result.per_query, expected)
    assert result.mean == pytest.approx(np.mean(expected))
    assert result.ci_low <= result.mean <= result.ci_high
    assert result.n_subsets == 12


def test_lds_perfect_and_reversed_and_constant():
    scores = torch.tensor([[1.0, 2.0, 4.0], [3.0, 1.0, 0.5]])
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    outputs = -(masks @ scores.numpy().T)  # helpful examples lower the measurement
    assert linear_datamodeling_score(scores, masks, outputs).mean == pytest.approx(1.0)
    assert linear_datamodeling_score(scores, masks, -outputs).mean == pytest.approx(-1.0)
    flat = outputs.copy()
    flat[:, 1] = 0.0  # a query whose outputs never change: NaN, skipped in the mean
    res = linear_datamodeling_score(scores, masks, flat)
    assert np.isnan(res.per_query[1]) and res.mean == pytest.approx(1.0)


def test_lds_errors():
    with pytest.raises(ValueError, match=r"outputs must have shape \(n_subsets, n_test\) = \(4, 2\)"):
        linear_datamodeling_score(np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="masks has 5 columns but scores has 3 training examples"):
        linear_datamodeling_score(np.ones((2, 3)), np.ones((4, 5)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="at least 3 subsets"):
        linear_datamodeling_score(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 2)))


def test_retrain_on_subsets_averages_seeds():
    data = torch.arange(10.0)
    calls = []

    def train_fn(subset, seed):
        calls.append((tuple(subset.indices), seed))
        return np.array([sum(subset[i].item() for i in range(len(subset))), seed])

    result = retrain_on_subsets(train_fn, data, 4, fraction=0.3, seeds=(1, 3), progress=False)
    assert result.masks.shape == (4, 10) and (result.masks.sum(1) == 3).all()
    assert len(calls) == 8
    np.testing.assert_allclose(result.outputs[:, 0], result.masks @ np.arange(10.0))
    np.testing.assert_allclose(result.outputs[:, 1], 2.0)
    assert result.outputs_per_seed.shape == (4, 2, 2)
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\)"):
        retrain_on_subsets(train_fn, data, 2, fraction=1.0, progress=False)
    with pytest.raises(ValueError, match="seeds is empty"):
        retrain_on_subsets(train_fn, data, 2, seeds=(), progress=False)


def test_leave_one_out_correlation_matches_scipy():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(2, 6))
    base = rng.normal(size=2)
    loo = base[None] + scores.T / 6 + 0.01 * rng.normal(size=(6, 2))
    res = leave_one_out_correlation(scores, loo, base)
    exp_p = [pearsonr(scores[i], loo[:, i] - base[i])[0] for i in range(2)]
    exp_s = [spearmanr(scores[i], loo[:, i] - base[i])[0] for i in range(2)]
    np.testing.assert_allclose(res.per_query_pearson, exp_p)
    np.testing.assert_allclose(res.per_query_spearman, exp_s)
    assert res.pearson > 0.9
    with pytest.raises(ValueError, match="Shapes do not match"):
        leave_one_out_correlation(scores, loo.T, base)


def test_roc_auc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    values = rng.integers(0, 5, 40).astype(float)  # many ties
    planted = rng.random(40) < 0.3
    assert roc_auc(values, planted) == pytest.approx(metrics.roc_auc_score(planted, values))
    two = np.stack([values, -values])
    expected = (metrics.roc_auc_score(planted, values) + metrics.roc_auc_score(planted, -values)) / 2
    assert roc_auc(two, planted) == pytest.approx(expected)
    with pytest.raises(ValueError, match="needs both planted and clean examples"):
        roc_auc(values, np.zeros(40, bool))


def test_precision_recall_at_k_by_hand():
    values = [0.9, 0.8, 0.7, 0.1, 0.05]
    planted = [True, False, True, True, False]
    assert precision_at_k(values, planted, 1) == 1.0
    assert precision_at_k(values, planted, 3) == pytest.approx(2 / 3)
    assert recall_at_k(values, planted, 3) == pytest.approx(2 / 3)
    assert recall_at_k(values, planted, 4) == 1.0
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
        precision_at_k(values, planted, 6)


def test_top1_accuracy_and_cover_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.2], [0.1, 0.2, 0.3, 0.9]])
    train = ["a", "b", "a", "b"]
    test = ["a", "a"]
    assert top1_accuracy(scores, train, test) == 0.5
    # k = 4 // 2 = 2: query 0 top {0, 2} both "a"; query 1 top {3, 2}: one "a"
    assert cover(scores, train, test) == pytest.approx(0.75)
    assert cover(scores, train, test, k=1) == 0.5
    with pytest.raises(ValueError, match=r"scores must be \(n_test, n_train\) = \(2, 4\)"):
        cover(scores.T, train, test)


def test_ihvp_error_relative_and_cosine():
    x, y = classification_data(n=20, d_in=3, classes=2)
    model = torch.nn.Linear(3, 2).to(DT)
    data = [(x, y)]
    exact = Exact(damping=0.1, curvature_type="ggn").fit(model, ClassificationTask(), data)
    G = torch.randn(5, 8, dtype=DT)
    err = ihvp_error(exact, exact, G)
    assert err.mean_relative_error == 0 and err.mean_cosine == pytest.approx(1)
    scaled = ihvp_error(exact, 2 * exact.solve(G), G)  # x = x*/2
    assert scaled.mean_relative_error == pytest.approx(0.5) and scaled.mean_cosine == pytest.approx(1)
    ident = Identity(damping=0.1).fit(model, ClassificationTask(), data)
    X, R = ident.solve(G), exact.solve(G)
    expected = ((X - R).norm(dim=1) / R.norm(dim=1)).mean()
    assert ihvp_error(ident, exact, G).mean_relative_error == pytest.approx(float(expected))
    small = Exact(damping=0.1).fit(model, ClassificationTask(), data, params=["bias"])
    with pytest.raises(ValueError, match="fitted on different parameter sets"):
        ihvp_error(exact, small, G)
