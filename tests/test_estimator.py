import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import influence
from influence import (
    ClassificationTask,
    Exact,
    Identity,
    InfluenceEstimator,
    InfluenceError,
    ModelChangedError,
    NonFiniteGradientError,
    NotFittedError,
    RegressionTask,
)

import logreg
import zoo
from influence.exceptions import StochasticModelError


@pytest.fixture(scope="module")
def fitted():
    model = zoo.mlp(hidden=(5,))
    x, y = zoo.classification_data(n=12)
    xt, yt = zoo.classification_data(n=5, seed=1)
    train, test = zoo.batches(x, y, 5), zoo.batches(xt, yt, 2)
    est = InfluenceEstimator(Exact(damping=0.5, curvature_type="ggn"), ClassificationTask()).fit(model, train)
    return est, train, test


def test_leave_one_out_sign_and_magnitude():
    """Exact scores / N predict the actual leave-one-out change in test loss (Pearson >= 0.95)."""
    l2 = 1e-2
    (x, y), (xt, yt) = logreg.make_data(n=40, n_test=6)
    model = logreg.train(x, y, l2)
    assert logreg.grad_norm(model, x, y, l2) < 1e-10
    est = InfluenceEstimator(Exact(damping=l2, curvature_type="hessian"), ClassificationTask()).fit(model, zoo.batches(x, y, 16))
    scores = est.pairwise_scores(zoo.batches(xt, yt, 3)).double()  # (6, 40)
    base = F.cross_entropy(model(xt), yt, reduction="none")
    actual = torch.zeros(6, 40, dtype=torch.float64)
    for j in range(40):
        weights = (torch.arange(40) != j).double()  # drop j, keep the 1/N normalisation
        retrained = logreg.train(x, y, l2, init=model, weights=weights)
        with torch.no_grad():
            actual[:, j] = F.cross_entropy(retrained(xt), yt, reduction="none") - base
    predicted = scores / 40
    r = np.corrcoef(predicted.flatten().numpy(), actual.flatten().numpy())[0, 1]
    assert r >= 0.95, r
    torch.testing.assert_close(predicted, actual, rtol=0.5, atol=2e-3)
    # the sign: removing a helpful (positive) example raises the loss
    assert (torch.sign(predicted) == torch.sign(actual))[actual.abs() > 1e-4].float().mean() > 0.95


def test_ridge_regression_closed_form():
    torch.manual_seed(0)
    n, d, lam = 20, 4, 0.3
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, dtype=torch.float64)
    xt, yt = torch.randn(3, d, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    w = model.weight.detach()[0]
    est = InfluenceEstimator(Exact(damping=lam), RegressionTask(), score_dtype=torch.float64)
    scores = est.fit(model, zoo.batches(x, y, 7)).pairwise_scores(zoo.batches(xt, yt, 2))
    H = x.T @ x / n + lam * torch.eye(d, dtype=torch.float64)
    g_train = (x @ w - y)[:, None] * x
    g_test = (xt @ w - yt)[:, None] * xt
    torch.testing.assert_close(scores, g_test @ torch.linalg.solve(H, g_train.T), atol=1e-12, rtol=1e-10)


def test_scores_are_consistent(fitted):
    est, train, test = fitted
    S = est.pairwise_scores(test)
    assert S.shape == (5, 12) and S.dtype == torch.float32
    Q = est.influence_factors(test)
    G = torch.cat([influence.per_sample_grads(est.model_, est.task_, b) for b in train])
    torch.testing.assert_close(S, (Q.double() @ G.T).float())
    self_s = est.self_scores()
    full = est.pairwise_scores(train, train)
    torch.testing.assert_close(self_s, torch.diagonal(full), rtol=1e-5, atol=1e-6)
    for largest in (True, False):
        v, i = est.top_k(test, 3, largest=largest)
        ref_v, ref_i = torch.topk(S, 3, dim=1, largest=largest)
        torch.testing.assert_close(v, ref_v)
        assert torch.equal(i, ref_i)


@settings(max_examples=8, deadline=None)
@given(train_bs=st.integers(1, 12), test_bs=st.integers(1, 5), chunk=st.one_of(st.none(), st.integers(1, 3)))
def test_invariant_to_batch_and_chunk_size(fitted, train_bs, test_bs, chunk):
    est, train, test = fitted
    reference = est.pairwise_scores(test)
    x = torch.cat([b[0] for b in train]); y = torch.cat([b[1] for b in train])
    xt = torch.cat([b[0] for b in test]); yt = torch.cat([b[1] for b in test])
    other = InfluenceEstimator(Exact(damping=0.5, curvature_type="ggn"), ClassificationTask(), chunk_size=chunk)
    other.fit(est.model_, zoo.batches(x, y, train_bs))
    torch.testing.assert_close(other.pairwise_scores(zoo.batches(xt, yt, test_bs)), reference, rtol=1e-5, atol=1e-6)


def test_identity_scores_are_gradient_dot_products(fitted):
    est, train, test = fitted
    ident = InfluenceEstimator(task=ClassificationTask(), score_dtype=torch.float64).fit(est.model_, train)
    G = torch.cat([influence.per_sample_grads(est.model_, est.task_, b) for b in train])
    Gt = torch.cat([influence.per_sample_grads(est.model_, est.task_, b) for b in test])
    torch.testing.assert_close(ident.pairwise_scores(test), Gt @ G.T)


def test_works_with_dataloaders_and_sklearn_params():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    est = InfluenceEstimator(Exact(damping=1.0), ClassificationTask())
    assert est.get_params()["curvature__damping"] == 1.0
    est.set_params(curvature__damping=2.0, chunk_size=3)
    assert est.curvature.damping == 2.0 and est.chunk_size == 3
    clone = influence.clone(est)
    assert clone.curvature is not est.curvature and clone.get_params(deep=False).keys() == est.get_params(deep=False).keys()
    assert est.fit(model, loader) is est
    assert est.curvature_ is not est.curvature  # the given curvature is not mutated
    assert not hasattr(est.curvature, "matrix_")
    assert est.pairwise_scores(loader).shape == (10, 10)
    assert est.num_train_ == 10
    with pytest.warns(UserWarning, match="shuffles"):
        InfluenceEstimator(Identity()).fit(model, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))
    with pytest.raises(ValueError, match="Invalid parameter 'dampng'"):
        est.set_params(dampng=1)


# ----------------------------------------------------------------------------- bad input
def test_methods_before_fit_raise():
    est = InfluenceEstimator()
    for call in (lambda: est.pairwise_scores([]), lambda: est.self_scores(), lambda: est.influence_factors([]), lambda: est.top_k([], 1)):
        with pytest.raises(NotFittedError, match=r"not fitted yet: call fit\(\.\.\.\)"):
            call()
    with pytest.raises(NotFittedError, match="call fit"):
        Exact().solve(torch.zeros(1, 3))


def test_empty_loader():
    with pytest.raises(InfluenceError, match="train_loader yielded no batches"):
        InfluenceEstimator(Exact()).fit(zoo.mlp(), [])


def test_unreadable_train_and_test_batches(fitted):
    est, train, test = fitted
    with pytest.raises(influence.BatchFormatError, match="could not find a tensor"):
        InfluenceEstimator(Identity()).fit(zoo.mlp(), [("a", "b", "c")])
    with pytest.raises(influence.BatchFormatError, match=r"could not read a batch of type tuple of length 3"):
        InfluenceEstimator(Exact()).fit(zoo.mlp(), [(torch.zeros(2, 4),) * 3])
    with pytest.raises(influence.BatchFormatError, match="could not read"):
        est.pairwise_scores([{"pixels": torch.zeros(2, 4)}])


def test_nan_gradients_name_the_examples(fitted):
    est, train, test = fitted
    x, y = zoo.classification_data(n=6)
    x[4, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"1 train example\(s\) at indices \[4\]"):
        est.pairwise_scores(test, zoo.batches(x, y, 3))
    with pytest.raises(NonFiniteGradientError, match=r"indices \[4\]"):
        InfluenceEstimator(Exact(curvature_type="fisher")).fit(est.model_, zoo.batches(x, y, 3)).self_scores()


def test_check_finite_rows_any_shape_and_overflowing_sums():
    from influence._guards import check_finite

    big = torch.full((3, 2, 4), 3e38)  # finite entries whose row sums overflow to inf
    check_finite(big, 0, "train")
    check_finite(torch.zeros(5), 0, "train")  # 1-D: one value per example
    bad = big.clone()
    bad[1, 0, 0], bad[1, 1, 3] = float("inf"), float("-inf")  # row sum is NaN
    bad[2, 1, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"2 test example\(s\) at indices \[11, 12\]"):
        check_finite(bad, 10, "test")
    with pytest.raises(NonFiniteGradientError, match=r"indices \[3\]"):
        check_finite(torch.tensor([0.0, 1.0, float("inf")]), 1, "train")


def test_no_trainable_parameters():
    model = zoo.mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        InfluenceEstimator().fit(model, [zoo.classification_data()])


def test_model_changed_after_fit():
    model = zoo.mlp()
    data = [zoo.classification_data()]
    est = InfluenceEstimator(Identity()).fit(model, data)
    with torch.no_grad():
        model[0].weight.add_(1e-3)
    with pytest.raises(ModelChangedError, match=r"changed after fit\(\).*Call fit"):
        est.pairwise_scores(data)


def test_classes_instead_of_instances():
    with pytest.raises(TypeError, match=r"got the class Exact: write Exact\(\.\.\.\)"):
        InfluenceEstimator(Exact).fit(zoo.mlp(), [zoo.classification_data()])
    with pytest.raises(TypeError, match=r"got the class ClassificationTask"):
        InfluenceEstimator(task=ClassificationTask).fit(zoo.mlp(), [zoo.classification_data()])
    with pytest.raises(TypeError, match="must be a Curvature instance"):
        InfluenceEstimator("ekfac").fit(zoo.mlp(), [zoo.classification_data()])


def test_bad_k_and_damping(fitted):
    est, train, test = fitted
    with pytest.raises(ValueError, match="k must be a positive integer"):
        est.top_k(test, 0)
    with pytest.raises(ValueError, match=r"k=13 exceeds the number of training examples \(12\)"):
        est.top_k(test, 13)
    with pytest.raises(ValueError, match="damping must be a finite float >= 0"):
        InfluenceEstimator(Exact(damping=-1.0)).fit(est.model_, train)


def test_dropout_in_training_mode_is_refused_or_warned():
    """Dropout left on: fit refuses (the scores would be random); self_check=False warns."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).double()
    with pytest.raises(StochasticModelError, match=r"stochastic in this mode.*1 \(Dropout, p=0.5\).*model.eval\(\)"):
        InfluenceEstimator().fit(model, [zoo.classification_data()])
    with pytest.warns(UserWarning, match=r"Dropout is active.*model.eval\(\)"):
        InfluenceEstimator(self_check=False).fit(model, [zoo.classification_data()])


def test_fit_makes_no_extra_pass_and_num_train_is_counted_once():
    """Identity's fit reads only the first batch (to check its format): no counting pass over
    the loader; num_train_ counts it on first access only (one pass) and is the example count."""
    x, y = zoo.classification_data(n=7)

    class Counting:
        def __init__(self, batches):
            self.batches, self.read = batches, 0

        def __iter__(self):
            for b in self.batches:
                self.read += 1
                yield b

    loader = Counting(zoo.batches(x, y, 3))
    est = InfluenceEstimator(Identity()).fit(zoo.mlp(), loader)
    assert loader.read == 1
    assert est.num_train_ == 7 and est.num_train_ == 7
    assert loader.read == 1 + 3
    with pytest.raises(influence.NotFittedError):
        InfluenceEstimator().num_train_
