"""``LiSSA(variant="paper")`` against a naive transcription of the study's LiSSA loop.

The study's code (Li et al. 2024, ``influence_function(..., hvp_cal='LiSSA')`` with
``n_iteration=3``, ``alpha_const=1``, ``lambda_c=10``), per parameter tensor, with ``v`` the query
gradient block and ``g_j`` the training gradients of that tensor::

    lambda_const = mean_j(mean(g_j ** 2)) / lambda_c
    x = v
    repeat n_iteration times:
        tmp = sum_j (<g_j, x> g_j - lambda_const x) / n
        x = v + x - alpha_const * tmp / 1000
    return x
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from influence import ConvergenceWarning, LiSSA, Task

DT = torch.float64


class TwoTensors(nn.Module):
    """Parameters of two shapes, so that the per-parameter-tensor blocks matter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 4, dtype=DT))
        self.bias = nn.Parameter(torch.zeros(5, dtype=DT))


class LinearLoss(Task):
    """``ℓ_j(θ) = ⟨a_j, θ⟩``: the per-example gradient is exactly the batch's ``a_j``."""

    def loss(self, model, batch):
        a_weight, a_bias = batch
        return (a_weight * model.weight).sum((1, 2)) + (a_bias * model.bias).sum(1)


def random_gradients(n=9, scale=8.0, seed=0):
    """Random per-example gradients; ``scale`` sets the curvature's size against 1000."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 3, 4, generator=g, dtype=DT), scale * torch.randn(n, 5, generator=g, dtype=DT)


def study_lissa(v: dict, grads: dict, divisor=1000.0, alpha_const=1.0, lambda_c=10.0, n_iteration=3) -> dict:
    """The study's loop, transcribed literally: one parameter tensor at a time."""
    out = {}
    for name, v_l in v.items():
        per_example = grads[name]
        n = len(per_example)
        lambda_const = torch.stack([torch.mean(g_j**2) for g_j in per_example]).mean() / lambda_c
        running = v_l
        for _ in range(n_iteration):
            tmp = torch.zeros_like(running)
            for g_j in per_example:
                tmp += (torch.sum(g_j * running) * g_j - lambda_const * running) / n
            running = v_l + running - alpha_const * tmp / divisor
        out[name] = running
    return out


def _fit(divisor=None, batch_size=4, **kw):
    a_weight, a_bias = random_gradients()
    loader = [(a_weight[i : i + batch_size], a_bias[i : i + batch_size]) for i in range(0, len(a_weight), batch_size)]
    params = {} if divisor is None else {"paper_divisor": divisor}
    lissa = LiSSA(damping="datainf", curvature_type="hessian", variant="paper", **params, **kw)
    return lissa.fit(TwoTensors(), LinearLoss(), loader), {"weight": a_weight, "bias": a_bias}


def _solve(lissa, G):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X = lissa.solve(G)
    return X, [w for w in caught if issubclass(w.category, ConvergenceWarning)]


@pytest.mark.parametrize("divisor", [None, 1.0, 37.5], ids=["default-1000", "1", "37.5"])
def test_paper_variant_is_the_studys_loop_on_random_gradients(divisor):
    lissa, grads = _fit(divisor)
    G = torch.randn(3, 17, generator=torch.Generator().manual_seed(1), dtype=DT)
    X, _ = _solve(lissa, G)
    query = lissa.layout_.unflatten(G)
    for row in range(G.shape[0]):
        v = {name: query[name][row] for name in ("weight", "bias")}
        expected = study_lissa(v, grads, divisor=1000.0 if divisor is None else divisor)
        flat = torch.cat([expected["weight"].reshape(-1), expected["bias"]])
        torch.testing.assert_close(X[row], flat, rtol=1e-12, atol=1e-12)


def test_the_divisor_matters_here_and_default_is_near_four_times_gradient_match():
    """The problem is sized so that ``/1000`` changes the answer: without it (divisor 1) the
    result is dominated by ``−(C − λI)³ g``; with it, ``x_3 ≈ 4 g − 6 (C − λI) g / 1000``."""
    G = torch.randn(3, 17, generator=torch.Generator().manual_seed(1), dtype=DT)
    study, _ = _solve(_fit()[0], G)
    old, _ = _solve(_fit(1.0)[0], G)
    gap = lambda a, b: float(((a - b).norm(dim=1) / b.norm(dim=1)).max())  # noqa: E731
    assert gap(old, study) > 1e3
    assert 0.05 < gap(study, 4 * G) < 0.5  # near 4 g, but the curvature term is visible
    assert gap(old, 4 * G) > 1e3


def test_paper_variant_warns_that_it_is_not_a_solver_and_records_the_divisor():
    lissa, _ = _fit()
    G = torch.randn(2, 17, generator=torch.Generator().manual_seed(2), dtype=DT)
    _, caught = _solve(lissa, G)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "variant='paper' runs the study's fixed 3 iterations and is not a convergent solver" in message
    assert "paper_divisor=1000" in message and "about 4 g" in message
    assert lissa.last_info_["scale"] == 1000.0 and lissa.last_info_["averaged"] is False
    # x_t ≈ (t + 1) g: the last step is ~1/4 of the result, the last two steps ~1/2
    assert lissa.last_info_["final_step"].numpy() == pytest.approx([0.25, 0.25], abs=0.05)
    assert lissa.last_info_["half_change"].numpy() == pytest.approx([0.5, 0.5], abs=0.1)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1000"])
def test_bad_paper_divisor(bad):
    with pytest.raises(ValueError, match=r"paper_divisor must be a finite float > 0 \(the study's 1000\); got"):
        _fit(bad)


def test_default_paper_divisor_is_the_studys_and_blocks_are_per_parameter_tensor():
    params = LiSSA(variant="paper").get_params()
    assert params["paper_divisor"] == 1000.0 and params["blocks"] == "parameter"
