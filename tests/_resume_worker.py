"""Runs a fit or a scoring that kills its own process (SIGKILL) after some batches.

Usage: python _resume_worker.py fit|score <dir> <kill_at_batch>
"""

from __future__ import annotations

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from zoo import batches, classification_data, mlp  # noqa: E402

from influence import ClassificationTask, Exact, Identity, InfluenceEstimator  # noqa: E402


class KillAfter:
    """Yields the batches; on pass ``on_pass`` the process is killed when batch ``k`` is
    requested (fit first reads one batch to check its format; scoring to a file first counts
    the examples in one pass)."""

    def __init__(self, items, k, on_pass=0):
        self.items, self.k, self.on_pass, self.passes = items, k, on_pass, 0

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.items):
            if i == self.k and self.passes == self.on_pass + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b


def problem():
    model = mlp(d_in=3, hidden=(3,), d_out=2, seed=4)
    x, y = classification_data(n=12, d_in=3, classes=2, seed=5)
    return model, batches(x, y, 2), [(x[:3], y[:3])]


def fit_estimator():
    return InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), ClassificationTask(), score_dtype=torch.float64)


def score_estimator(model, train):
    return InfluenceEstimator(Identity(), ClassificationTask(), score_dtype=torch.float64).fit(model, train)


if __name__ == "__main__":
    mode, directory, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, train, test = problem()
    if mode == "fit":
        fit_estimator().fit(model, KillAfter(train, k, on_pass=1), checkpoint_dir=directory, checkpoint_every=2)
    else:
        est = score_estimator(model, train)
        est.pairwise_scores(test, KillAfter(train, k, on_pass=1), out=os.path.join(directory, "scores.npy"), checkpoint_every=2)
    sys.exit("not killed")
