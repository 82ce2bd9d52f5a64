"""Runs a fit or a scoring that kills its own process (SIGKILL) after some batches, or a
scoring that pauses until a file appears.

Usage: python _resume_worker.py fit|score <dir> <kill_at_batch>
       python _resume_worker.py score-wait <dir> <go_file>
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from zoo import batches, classification_data, mlp  # noqa: E402

from influence import ClassificationTask, Exact, Identity, InfluenceEstimator  # noqa: E402


class At:
    """Yields the batches of ``items``; on pass ``on_pass`` (0-based) calls ``action()`` when
    batch ``k`` is requested (fit first reads one batch to check its format; scoring to a file
    first counts the examples in one pass)."""

    def __init__(self, items, k, on_pass, action):
        self.items, self.k, self.on_pass, self.action, self.passes = items, k, on_pass, action, 0

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.items):
            if i == self.k and self.passes == self.on_pass + 1:
                self.action()
            yield b


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.05)


def problem():
    model = mlp(d_in=3, hidden=(3,), d_out=2, seed=4)
    x, y = classification_data(n=12, d_in=3, classes=2, seed=5)
    return model, batches(x, y, 2), [(x[:3], y[:3])]


def fit_estimator():
    return InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), ClassificationTask(), score_dtype=torch.float64)


def score_estimator(model, train):
    return InfluenceEstimator(Identity(), ClassificationTask(), score_dtype=torch.float64).fit(model, train)


if __name__ == "__main__":
    mode, directory = sys.argv[1], sys.argv[2]
    model, train, test = problem()
    if mode == "score-wait":
        est = score_estimator(model, train)
        go = sys.argv[3]
        est.pairwise_scores(test, At(train, 2, 1, lambda: wait_for(go)), out=os.path.join(directory, "scores.npy"))
        sys.exit(0)
    k = int(sys.argv[3])
    if mode == "fit":
        fit_estimator().fit(model, At(train, k, 1, kill), checkpoint_dir=directory, checkpoint_every=2)
    else:
        est = score_estimator(model, train)
        est.pairwise_scores(test, At(train, k, 1, kill), out=os.path.join(directory, "scores.npy"), checkpoint_every=2)
    sys.exit("not killed")
