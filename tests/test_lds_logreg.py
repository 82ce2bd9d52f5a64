"""End-to-end: on a deterministic, converged, L2-regularised logistic regression, exact
influence predicts retraining (LDS) and self-influence finds flipped labels.

Training minimises ``(1/|S|) Σ_{j∈S} ℓ_j + (λ/2)‖θ‖²`` by Newton's method in float64 to a
gradient norm below 1e-10, warm-started from the full-data optimum, so retraining is exact and
deterministic (one seed per subset suffices). With λ = 0.1 the measured LDS is 0.962
(bootstrap interval [0.957, 0.967]); with λ = 0.01 it is 0.912: half-subsets move a weakly
regularised model further than a first-order expansion follows. The Hessian of that objective is
``H + λI`` with ``H`` the Hessian of the mean loss: ``Exact(damping=λ)`` is the exact influence.
"""

import pytest
import torch

import influence
from influence import ClassificationTask, Exact, InfluenceEstimator
from influence.evaluation import linear_datamodeling_score, retrain_on_subsets, roc_auc
from zoo import DT

LAM = 0.1
TASK = ClassificationTask()


def make_data(n, d, seed):
    """Gaussian features, labels drawn from a logistic model (so not separable)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=DT) * 1.5
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(x @ w)).long()
    return x, y


def fit_logreg(x, y, init=None, lam=LAM, tol=1e-10):
    """Newton's method on the regularised objective (closed-form softmax gradient/Hessian).

    The parameters ``T = [W | b]`` (2 x (d+1)) are all regularised, so the objective's Hessian
    is the mean loss's Hessian plus ``λI`` in the model's parameter space.
    """
    n, d = x.shape
    X = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
    Y = torch.nn.functional.one_hot(y, 2).to(DT)
    T = torch.zeros(2, d + 1, dtype=DT) if init is None else init.clone()
    for _ in range(100):
        P = torch.softmax(X @ T.T, 1)
        g = (P - Y).T @ X / n + lam * T
        if g.norm() < tol:
            break
        A = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
        H = torch.einsum("icd,if,ig->cfdg", A, X, X).reshape(2 * d + 2, 2 * d + 2) / n
        T = T - torch.linalg.solve(H + lam * torch.eye(2 * d + 2, dtype=DT), g.reshape(-1)).reshape(T.shape)
    else:
        raise AssertionError(f"Newton did not converge: |grad| = {float(g.norm()):.3g}")
    model = torch.nn.Linear(d, 2).to(DT)
    with torch.no_grad():
        model.weight.copy_(T[:, :-1])
        model.bias.copy_(T[:, -1])
    return model.eval(), T


def query_losses(model, x, y):
    with torch.no_grad():
        return TASK.loss(model, (x, y)).numpy()


@pytest.fixture(scope="module")
def problem():
    x, y = make_data(80, 5, seed=0)
    xtr, ytr, xte, yte = x[:60], y[:60], x[60:], y[60:]
    model, theta = fit_logreg(xtr, ytr)
    dataset = torch.utils.data.TensorDataset(xtr, ytr)

    def train_fn(subset, seed):
        idx = torch.tensor(subset.indices)
        sub_model, _ = fit_logreg(xtr[idx], ytr[idx], init=theta)
        return query_losses(sub_model, xte, yte)

    truth = retrain_on_subsets(train_fn, dataset, n_subsets=50, fraction=0.5, progress=False)
    return model, [(xtr, ytr)], [(xte, yte)], truth


def lds_of(curvature, problem):
    model, train, test, truth = problem
    est = InfluenceEstimator(curvature, score_dtype=DT).fit(model, train)
    return linear_datamodeling_score(est.pairwise_scores(test), truth.masks, truth.outputs)


def test_exact_influence_reaches_lds_095(problem):
    result = lds_of(Exact(damping=LAM, curvature_type="hessian"), problem)
    assert result.mean >= 0.95, str(result)


def test_cg_matches_exact_lds_within_001(problem):
    CG = getattr(influence, "CG", None)
    if CG is None:
        pytest.skip("influence.CG is not on this branch (it comes with issue 3); enabled once merged")
    cg = CG(damping=LAM)
    tight = {k: v for k, v in {"rtol": 1e-12, "tol": 1e-12, "max_iter": 1000}.items() if k in cg.get_params()}
    cg.set_params(**tight)
    exact = lds_of(Exact(damping=LAM), problem).mean
    assert abs(lds_of(cg, problem).mean - exact) <= 0.01


def test_self_influence_finds_flipped_labels():
    """Two Gaussian clusters (means ±(1.5, 1.5), unit variance), 10% of labels flipped."""
    g = torch.Generator().manual_seed(3)
    y_clean = torch.arange(100) % 2
    x = torch.randn(100, 2, generator=g, dtype=DT) + 1.5 * (2 * y_clean[:, None] - 1)
    flipped = torch.zeros(100, dtype=torch.bool)
    flipped[torch.randperm(100, generator=g)[:10]] = True
    y = torch.where(flipped, 1 - y_clean, y_clean)
    model, _ = fit_logreg(x, y)
    est = InfluenceEstimator(Exact(damping=LAM), score_dtype=DT).fit(model, [(x, y)])
    auc = roc_auc(est.self_scores().numpy(), flipped.numpy())
    assert auc >= 0.9, auc
