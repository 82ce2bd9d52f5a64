"""A deterministic, converged, L2-regularised logistic regression (float64) and its retraining."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DT = torch.float64


def make_data(n=40, n_test=10, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(n + n_test, d, generator=g, dtype=DT)
    p = torch.sigmoid(x @ w_true * 1.5)
    y = (torch.rand(n + n_test, generator=g, dtype=DT) < p).long()
    return (x[:n], y[:n]), (x[n:], y[n:])


def train(x, y, l2, init=None, weights=None, iters=30):
    """Minimises ``mean_j w_j CE_j + l2/2 ||θ||²`` by damped Newton to machine precision.

    Returns an ``nn.Linear(d, 2)`` in eval mode (gradient norm ~1e-15).
    """
    d = x.shape[1]
    model = torch.nn.Linear(d, 2).to(DT)
    shapes = [p.shape for p in model.parameters()]
    if init is not None:
        theta = torch.cat([p.detach().reshape(-1) for p in init.parameters()]).clone()
    else:
        theta = torch.zeros(sum(s.numel() for s in shapes), dtype=DT)
    weights = torch.ones(len(x), dtype=DT) if weights is None else weights

    def f(flat):
        w, b = flat[: 2 * d].reshape(2, d), flat[2 * d :]
        ce = F.cross_entropy(x @ w.T + b, y, reduction="none")
        return (weights * ce).sum() / len(x) + 0.5 * l2 * (flat**2).sum()

    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, theta)
        if g.norm() < 1e-14:
            break
        H = torch.autograd.functional.hessian(f, theta)
        step = torch.linalg.solve(H, g)
        t, f0 = 1.0, f(theta)
        while f(theta - t * step) > f0 - 0.25 * t * (g @ step) and t > 1e-8:
            t /= 2
        theta = theta - t * step
    with torch.no_grad():
        model.weight.copy_(theta[: 2 * d].reshape(2, d))
        model.bias.copy_(theta[2 * d :])
    return model.eval()


def objective(model, x, y, l2, weights):
    ce = F.cross_entropy(model(x), y, reduction="none")
    reg = sum((p**2).sum() for p in model.parameters())
    return (weights * ce).sum() / len(x) + 0.5 * l2 * reg


def grad_norm(model, x, y, l2):
    model.zero_grad()
    objective(model, x, y, l2, torch.ones(len(x), dtype=DT)).backward()
    return float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
