"""Common input slips: a Dataset for a DataLoader, loaders out of index order, drop_last,
float class labels."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

import oracles
import zoo
from influence import (
    CG,
    BatchFormatError,
    ClassificationTask,
    Exact,
    Identity,
    InfluenceError,
    InfluenceEstimator,
    NonFiniteGradientError,
    per_sample_grads,
)


@pytest.fixture()
def data():
    x, y = zoo.classification_data(n=10)
    return zoo.mlp(), x, y, TensorDataset(x, y)


def test_a_dataset_instead_of_a_dataloader_is_refused_with_the_fix(data):
    model, x, y, dataset = data
    fix = r"is a Dataset \(TensorDataset\), not a DataLoader: .*Wrap it: DataLoader\(dataset, batch_size=\.\.\., shuffle=False\)"
    with pytest.raises(InfluenceError, match="train_loader " + fix):
        InfluenceEstimator(Exact(damping=0.1)).fit(model, dataset)
    with pytest.raises(InfluenceError, match="loader " + fix):
        CG(damping=0.1).fit(model, ClassificationTask(), dataset)
    est = InfluenceEstimator(Exact(damping=0.1)).fit(model, [(x, y)])  # a list of batches is fine
    with pytest.raises(InfluenceError, match="test_loader " + fix):
        est.pairwise_scores(dataset)
    loader = DataLoader(dataset, batch_size=4)
    torch.testing.assert_close(est.pairwise_scores(loader), est.pairwise_scores([(x, y)]))


def _custom_batches(n):
    return [[0, 1, 2], [5, 6, 7], [3, 4], [8, 9]][: n]


@pytest.mark.parametrize("make, what", [
    (lambda ds: DataLoader(ds, batch_size=4, shuffle=True), r"shuffles \(shuffle=True, a RandomSampler\)"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(8))), "draws examples with a SubsetRandomSampler"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * 10, 10)), "draws examples with a WeightedRandomSampler"),
    (lambda ds: DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=1, rank=0)), "draws examples with a DistributedSampler"),
    (lambda ds: DataLoader(ds, batch_sampler=_custom_batches(4)), r"a custom batch_sampler \(list\)"),
    (lambda ds: DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, False)), "draws examples with a RandomSampler|shuffles"),
], ids=["shuffle", "subset", "weighted", "distributed", "custom-batch-sampler", "batch-sampler-over-random"])
def test_any_non_sequential_order_warns(data, make, what):
    model, _, _, dataset = data
    with pytest.warns(UserWarning, match=what + ".*score columns follow the loader's order.*shuffle=False"):
        InfluenceEstimator(Identity()).fit(model, make(dataset))


@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=4),
    lambda ds: DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 5, drop_last=True)),
], ids=["default", "sequential-batch-sampler"])
def test_sequential_loaders_do_not_warn(data, make):
    model, _, _, dataset = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InfluenceEstimator(Identity()).fit(model, make(dataset)).pairwise_scores([zoo.classification_data(n=2)])


def test_drop_last_warns_with_the_number_dropped_at_fit_and_scoring(data):
    model, x, y, dataset = data
    loader = DataLoader(dataset, batch_size=4, drop_last=True)
    message = r"train_loader has drop_last=True: the last 2 of its 10 examples \(10 % batch_size 4\) are never seen"
    with pytest.warns(UserWarning, match=message):
        est = InfluenceEstimator(Identity()).fit(model, loader)
    assert est.num_train_ == 8
    with pytest.warns(UserWarning, match=message):
        scores = est.pairwise_scores([(x[:2], y[:2])], train_loader=loader)
    assert scores.shape == (2, 8)


def test_float_labels_must_be_whole_numbers():
    model = zoo.mlp()
    x, y = zoo.classification_data(n=5)
    task = ClassificationTask()
    as_float = y.to(torch.float32)
    torch.testing.assert_close(task.loss(model, (x, as_float)), task.loss(model, (x, y)))  # 1.0 is class 1
    torch.testing.assert_close(per_sample_grads(model, task, (x, as_float)), per_sample_grads(model, task, (x, y)))
    bad = as_float.clone()
    bad[3] = 1.5
    with pytest.raises(BatchFormatError, match=r"a torch.float32 label is 1.5, not a whole number \(.long\(\) would silently truncate"):
        task.loss(model, (x, bad))
    with pytest.raises(BatchFormatError, match="label is 1.5, not a whole number"):
        InfluenceEstimator(Exact(damping=0.1), task).fit(model, [(x, bad)])  # the curvature pass
    with pytest.raises(BatchFormatError, match="label is 1.5, not a whole number"):
        InfluenceEstimator(Identity(), task, gradient_method="hooks").fit(model, [(x, y)]).pairwise_scores([(x, bad)])
    # under vmap Python cannot read the labels: the example's gradient is NaN, and reported
    G = per_sample_grads(model, task, (x, bad))
    assert torch.isfinite(G).all(1).tolist() == [True, True, True, False, True]
    torch.testing.assert_close(G[[0, 1, 2, 4]], oracles.loop_grads(model, task.loss, (x, y))[[0, 1, 2, 4]])
    est = InfluenceEstimator(Identity(), task, gradient_method="func").fit(model, [(x, y)])
    with pytest.raises(BatchFormatError, match="label is 1.5, not a whole number"):
        est.pairwise_scores([(x, bad)])  # the first-batch check reads the labels outside vmap
    est = InfluenceEstimator(Identity(), task, gradient_method="func", self_check=False).fit(model, [(x, y)])
    with pytest.raises(NonFiniteGradientError, match=r"1 test example\(s\) at indices \[3\]. Check those examples' inputs and labels"):
        est.pairwise_scores([(x, bad)])
    with pytest.raises(BatchFormatError, match=r"class-index targets of shape \(B,\); got \(5, 3\). For one-hot labels pass y.argmax\(-1\)"):
        task.loss(model, (x, torch.nn.functional.one_hot(y, 3).float()))
