"""CG preconditioned by K-FAC/EK-FAC: the exact solution in fewer iterations where the GGN's
ill-conditioning is Kronecker-shaped (input features on different scales)."""

from __future__ import annotations

import torch

import zoo
from influence import CG, EKFAC, KFAC, ClassificationTask, Exact, per_sample_grads

DT = torch.float64


def ill_scaled_problem():
    """A one-hidden-layer classifier (43 parameters, 256 examples: a full-rank GGN) whose 6
    input features span 4 orders of magnitude: the GGN's ill-conditioning lies in K-FAC's
    input factors."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g, dtype=DT) * torch.logspace(-2, 2, 6, dtype=DT)
    y = torch.randint(0, 3, (256,), generator=g)
    return zoo.mlp(d_in=6, hidden=(4,), d_out=3), ClassificationTask(), [(x, y)], (x[:2], y[:2])


def test_kronecker_preconditioned_cg_reaches_exact_in_fewer_iterations():
    model, task, loader, query = ill_scaled_problem()
    damping, rtol = 1e-5, 1e-8
    G = per_sample_grads(model, task, query, objective="measurement")
    dense = Exact(damping=damping, curvature_type="ggn").fit(model, task, loader)
    exact = dense.solve(G)
    plain = CG(damping=damping, rtol=rtol, max_iter=1000).fit(model, task, loader)
    plain.solve(G)
    plain_iterations = int(plain.last_info_.iterations.min())
    assert plain_iterations >= 80  # measured 97-100
    for pre in (KFAC(fisher_type="expected"), EKFAC(fisher_type="expected")):
        pre.fit(model, task, loader)
        cg = CG(damping=damping, rtol=rtol, max_iter=1000, preconditioner=pre).fit(model, task, loader)
        X = cg.solve(G)
        assert cg.preconditioner_ is pre  # fitted once, used as is
        assert bool(cg.last_info_.converged.all())
        iterations = int(cg.last_info_.iterations.max())
        assert iterations <= 50 and iterations <= plain_iterations / 2  # measured 39-43
        # the dense (C + λI) x equals g to rtol; x equals Exact's to cond · rtol
        assert float(((dense.matmat(X) - G).norm(dim=1) / G.norm(dim=1)).max()) <= 1.01 * rtol
        assert float(((X - exact).norm(dim=1) / exact.norm(dim=1)).max()) < 1e-4
