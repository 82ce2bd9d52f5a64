"""A model that is stochastic in its current mode is refused at fit and at every scoring call.

Before this check, ``F.dropout``, an LSTM's inter-layer dropout and attention dropout in
``train()`` mode gave different scores on two identical calls with no warning, and a
``model.train()`` after ``fit`` went unnoticed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import influence

from influence import ClassificationTask, Identity, InfluenceEstimator
from influence.exceptions import StochasticModelError
from zoo import DT, classification_data, mlp

VOCAB = 11


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.dropout(torch.tanh(self.fc(x)), p=0.3, training=self.training))


class LSTMDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.rnn = nn.LSTM(4, 4, num_layers=2, dropout=0.5, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0][:, -1])


class AttentionDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.attn = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def vector_data():
    return [classification_data(n=6)], [classification_data(n=3, seed=1)]


def token_data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (6, 5), generator=g)
    return [(ids, torch.randint(0, 3, (6,), generator=g))], [(ids[:3], torch.tensor([0, 1, 2]))]


CASES = [
    ("functional_dropout", FunctionalDropout, vector_data, r"Modules in training mode"),
    ("lstm_dropout", LSTMDropout, token_data, r"rnn \(LSTM, p=0.5\)"),
    ("attention_dropout", AttentionDropout, token_data, r"attn \(MultiheadAttention, p=0.5\)"),
]


@pytest.mark.parametrize("name,cls,data,names", CASES, ids=[c[0] for c in CASES])
def test_stochastic_model_is_refused_at_fit(name, cls, data, names):
    torch.manual_seed(0)
    model = cls().to(DT).train()
    train, _ = data()
    with pytest.raises(StochasticModelError, match=r"stochastic in this mode.*first training batch.*" + names + r".*model\.eval\(\)"):
        InfluenceEstimator(Identity(), ClassificationTask()).fit(model, train)
    model.eval()  # the fix the message names
    InfluenceEstimator(Identity(), ClassificationTask()).fit(model, train)


@pytest.mark.parametrize("name,cls,data,names", CASES, ids=[c[0] for c in CASES])
def test_train_mode_after_fit_is_refused_at_scoring(name, cls, data, names):
    torch.manual_seed(0)
    model = cls().to(DT).eval()
    train, test = data()
    est = InfluenceEstimator(Identity(), ClassificationTask()).fit(model, train)
    reference = est.pairwise_scores(test)
    model.train()
    for call, stage in [(lambda: est.pairwise_scores(test), "query"), (lambda: est.top_k(test, 2), "query"),
                        (lambda: est.influence_factors(test), "query"), (est.self_scores, "training")]:
        with pytest.raises(StochasticModelError, match=f"first {stage} batch"):
            call()
    model.eval()
    torch.testing.assert_close(est.pairwise_scores(test), reference)


def test_deterministic_model_in_train_mode_passes_and_the_check_can_be_disabled():
    """train() without any randomness changes nothing (no false alarm); self_check=False skips
    the check (and warns about active dropout modules instead)."""
    model = mlp().train()
    train, test = vector_data()
    est = InfluenceEstimator(Identity(), ClassificationTask()).fit(model, train)
    assert est.pairwise_scores(test).shape == (3, 6)
    model = LSTMDropout().to(DT).train()
    train, test = token_data()
    with pytest.warns(UserWarning, match=r"Dropout is active .*rnn \(LSTM, p=0.5\)"):
        est = InfluenceEstimator(Identity(), ClassificationTask(), self_check=False).fit(model, train)
    est.pairwise_scores(test)  # random, as the user asked


def test_a_nan_input_is_reported_as_non_finite_not_as_randomness():
    """A loss that is NaN in both identical calls is deterministic: the finite check names the
    example (NonFiniteGradientError), the stochasticity check must not claim dropout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    X[2, 0] = float("nan")
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    est = influence.InfluenceEstimator(influence.Identity(), influence.ClassificationTask())
    with pytest.raises(influence.NonFiniteGradientError, match=r"indices \[2\]"):
        est.fit(model, loader).self_scores()
