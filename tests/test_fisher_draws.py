"""True-Fisher targets keyed by example: the same fit for any batching, and the right distribution."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import zoo
from influence import (
    EKFAC,
    KFAC,
    ClassificationTask,
    Diagonal,
    FallbackWarning,
    InfluenceError,
    InfluenceEstimator,
    LanguageModelingTask,
    RegressionTask,
)
from influence.draws import TargetDraws
from influence.tasks import sample_categorical

DT = torch.float64
BATCHINGS = ([4, 4, 4, 4], [8, 8], [16], [3, 5, 1, 7])


def split(x, y, sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(x[s : s + n], y[s : s + n]) for s, n in zip(starts, sizes)]


def fit_all(make, model, task, loaders):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        return [InfluenceEstimator(make(), task, score_dtype=DT).fit(model, loader) for loader in loaders]


def assert_same_fits(fits, query):
    reference = fits[0].curvature_.statistics_
    scores = fits[0].pairwise_scores(query)
    for est in fits[1:]:
        assert sorted(est.curvature_.statistics_) == sorted(reference)
        for key, value in reference.items():
            torch.testing.assert_close(est.curvature_.statistics_[key], value, rtol=1e-10, atol=1e-13, msg=key)
        torch.testing.assert_close(est.pairwise_scores(query), scores, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, Diagonal])
def test_true_fisher_fit_does_not_depend_on_the_batching(cls):
    # failed before the draws were keyed by example: 13-42 % apart between batch sizes
    model = zoo.mlp(d_in=3, hidden=(4,), d_out=3, seed=1)
    model[0].bias.requires_grad_(False)  # K-FAC: layer 0's weight on the diagonal fallback
    x, y = zoo.classification_data(n=16, d_in=3, classes=3, seed=2)
    make = lambda: cls(damping=0.1, fisher_type="true", num_samples=2, seed=3)  # noqa: E731
    fits = fit_all(make, model, ClassificationTask(), [split(x, y, s) for s in BATCHINGS])
    assert_same_fits(fits, [(x[:2], y[:2])])
    (other_seed,) = fit_all(lambda: cls(damping=0.1, num_samples=2, seed=4), model, ClassificationTask(), [split(x, y, [16])])
    key = "diagonal/sum" if cls is Diagonal else "2/S"
    assert not torch.allclose(other_seed.curvature_.statistics_[key], fits[0].curvature_.statistics_[key])


def test_true_fisher_regression_does_not_depend_on_the_batching():
    model = zoo.mlp(d_in=3, hidden=(4,), d_out=2, seed=5)
    x = torch.randn(16, 3, dtype=DT, generator=torch.Generator().manual_seed(6))
    y = torch.randn(16, 2, dtype=DT, generator=torch.Generator().manual_seed(7))
    fits = fit_all(lambda: EKFAC(damping=0.1, seed=1), model, RegressionTask(), [split(x, y, s) for s in BATCHINGS])
    assert_same_fits(fits, [(x[:2], y[:2])])


def test_true_fisher_language_model_does_not_depend_on_the_batching():
    # per-token draws keyed by (example, token position); right padding keeps the keys
    model = zoo.tiny_lm(seed=2)
    batch = zoo.lm_batch(n=6, T=7, labels=True, seed=3)
    loaders = [zoo.dict_batches(batch, b) for b in (2, 3, 6)]
    loaders.append([{k: v[s:e] for k, v in batch.items()} for s, e in ((0, 1), (1, 5), (5, 6))])
    fits = fit_all(lambda: EKFAC(damping=0.1, fallback="identity"), model, LanguageModelingTask(), loaders)
    assert_same_fits(fits, [zoo.lm_batch(n=2, T=7, seed=4)])


def test_draws_are_keyed_by_example_and_position():
    index = torch.arange(10, 20)
    full = TargetDraws(5, index, stream=(1, 0))
    u = full.uniform((4,))
    assert u.shape == (10, 4) and u.dtype == DT
    part = TargetDraws(5, index[[7, 2]], stream=(1, 0))
    assert torch.equal(part.uniform((4,)), u[[7, 2]])  # any batch, any order
    assert torch.equal(part.uniform((2,)), u[[7, 2], :2])  # positions keep their keys (padding)
    assert torch.equal(part.uniform((2, 2)), u[[7, 2]].reshape(2, 2, 2))  # flat positions
    others = [TargetDraws(6, index, (1, 0)), full.substream(1), TargetDraws(5, index, (0, 0)), TargetDraws(5, index + 10, (1, 0))]
    for other in others:  # another seed, sample k, pass, or examples: other numbers
        assert not torch.isclose(other.uniform((4,)), u).any()
    assert not torch.isclose(full.uniform((4,), channel=1), u).any()
    big = TargetDraws(0, torch.tensor([2**40 + 3, 3]))  # indices beyond 32 bits: both words count
    assert big.uniform()[0] != big.uniform()[1]


def test_keyed_uniforms_are_uniform_and_independent():
    u = TargetDraws(0, torch.arange(20_000)).uniform((5,))
    assert float(u.min()) >= 0 and float(u.max()) < 1
    flat = u.flatten()
    counts = torch.bincount((flat * 50).long(), minlength=50).double()
    expected = flat.numel() / 50
    assert ((counts - expected) ** 2 / expected).sum() < 85.4  # chi-square, 49 dof, p = 0.001
    # pairs of neighbouring positions and neighbouring examples: uniform on a 10 x 10 grid
    for a, b in ((u[:, 0], u[:, 1]), (u[:-1, 2], u[1:, 2])):
        cell = (a * 10).long() * 10 + (b * 10).long()
        counts = torch.bincount(cell, minlength=100).double()
        expected = cell.numel() / 100
        assert ((counts - expected) ** 2 / expected).sum() < 148.2  # 99 dof, p = 0.001


def test_keyed_normals_are_standard_normal():
    z = TargetDraws(1, torch.arange(50_000)).normal((2,))
    assert z.shape == (50_000, 2)
    flat = z.flatten()
    assert abs(float(flat.mean())) < 0.015 and abs(float(flat.var()) - 1) < 0.02  # ~4.5 sigma
    sorted_z = flat.sort().values  # Kolmogorov-Smirnov against the normal CDF
    cdf = 0.5 * (1 + torch.erf(sorted_z / math.sqrt(2)))
    n = flat.numel()
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert float(ks) < 1.95 / math.sqrt(n)  # p = 0.001
    assert abs(float(torch.corrcoef(z.T)[0, 1])) < 0.015


def test_classification_targets_follow_the_softmax():
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, float("-inf")], dtype=DT)
    n = 100_000
    draws = TargetDraws(0, torch.arange(n), stream=(0, 0))
    y = ClassificationTask().sample_targets(logits.expand(n, 5), None, draws)
    assert y.shape == (n,) and int((y == 4).sum()) == 0  # probability zero: never drawn
    freq = torch.bincount(y, minlength=5).double() / n
    torch.testing.assert_close(freq, torch.softmax(logits, -1), rtol=0, atol=7e-3)  # 4.5 sigma


def test_language_model_targets_follow_the_softmax_per_token():
    n, T, V = 40_000, 4, 3
    position_logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 1.0], [5.0, 5.0, 5.0]], dtype=DT)
    outputs = position_logits.expand(n, T, V)
    labels = torch.ones(n, T, dtype=torch.long)
    labels[:, 2] = -100  # an ignored target (position 1) stays ignored
    batch = {"input_ids": torch.ones(n, T, dtype=torch.long), "labels": labels}
    y = LanguageModelingTask().sample_targets(outputs, batch, TargetDraws(3, torch.arange(n), (0, 0)))
    assert y.shape == (n, T - 1) and bool((y[:, 1] == -100).all())
    for t in (0, 2):  # logits at t predict the token at t + 1
        freq = torch.bincount(y[:, t], minlength=V).double() / n
        torch.testing.assert_close(freq, torch.softmax(position_logits[t], -1), rtol=0, atol=0.011)
    assert abs(float(torch.corrcoef(torch.stack([y[:, 0], y[:, 2]]).double())[0, 1])) < 0.02


def test_regression_targets_are_gaussian_around_the_outputs():
    n = 50_000
    outputs = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float32).expand(n, 3)
    y = RegressionTask().sample_targets(outputs, None, TargetDraws(2, torch.arange(n), (0, 0)))
    assert y.shape == (n, 3) and y.dtype == torch.float32
    noise = (y - outputs).double()
    assert noise.mean(0).abs().max() < 0.02 and (noise.var(0) - 1).abs().max() < 0.03


def test_sample_categorical_checks_the_uniforms_shape():
    with pytest.raises(ValueError, match=r"uniforms must have the logits' shape without the class dimension, \(3,\); got \(3, 1\)"):
        sample_categorical(torch.zeros(3, 4), torch.zeros(3, 1))


def test_target_draws_reject_bad_keys():
    with pytest.raises(TypeError, match="example_index must be a 1-D integer tensor"):
        TargetDraws(0, torch.zeros(3))
    with pytest.raises(ValueError, match="example indices must be >= 0"):
        TargetDraws(0, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="stream must hold non-negative ints"):
        TargetDraws(0, torch.arange(2), stream=(0, -1))


class _OldSignatureTask(ClassificationTask):
    def sample_targets(self, outputs, batch, generator=None):
        return sample_categorical(outputs, torch.rand(outputs.shape[:-1], generator=generator))


def test_a_task_with_the_old_sample_targets_signature_is_told_what_changed():
    model = zoo.mlp(d_in=3, hidden=(), d_out=2)
    x, y = zoo.classification_data(n=4, d_in=3, classes=2)
    for cls in (KFAC, Diagonal):
        with pytest.raises(InfluenceError, match=r"sample_targets\(outputs, batch, generator\).*now sample_targets\(outputs, batch, draws\).*draws.uniform"):
            cls().fit(model, _OldSignatureTask(), [(x, y)])
    cls(fisher_type="empirical").fit(model, _OldSignatureTask(), [(x, y)])  # never samples: fine
