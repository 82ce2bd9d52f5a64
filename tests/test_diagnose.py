"""``diagnose``: the trust report flags what it should, and renders as a table and JSON."""

import json
import warnings

import pytest
import torch

import influence
from influence import (
    Curvature,
    Exact,
    Identity,
    InfluenceEstimator,
    NotFittedError,
    diagnose,
)
from influence.curvature.exact import Exact as _Exact
from test_lds_logreg import fit_logreg
from zoo import DT, batches, mlp


def correlated_data(n=40, seed=0):
    """Strongly correlated features, so a diagonal curvature is far from the exact one."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, generator=g, dtype=DT)
    x = torch.cat([base, base + 0.05 * torch.randn(n, 1, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)], 1)
    y = (base[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).long()
    return x, y


class DiagonalExact(Curvature):
    """Deliberately wrong: keeps only the diagonal of the exact Hessian."""

    def _fit(self, model, task, loader, layout):
        self.diag_ = _Exact(damping=self.damping).fit(model, task, loader, layout).matrix_.diagonal()

    def _solve(self, G, damping):
        return G / (self.diag_ + damping)

    def _matmat(self, V, damping):
        return V * (self.diag_ + damping)


@pytest.fixture(scope="module")
def trained():
    x, y = correlated_data()
    model, _ = fit_logreg(x, y, lam=1e-6)
    return model, batches(x, y, 16), batches(*correlated_data(12, seed=1), 6)


def test_exact_on_converged_model_raises_no_flag_and_renders(trained, tmp_path):
    model, train, test = trained
    est = InfluenceEstimator(Exact(damping=1e-3, curvature_type="hessian"), score_dtype=DT).fit(model, train)
    report = diagnose(est, test, k=5, thresholds={"dominance_share": 1.01})
    assert report.gradient_norm_ratio < 1e-3
    assert report.ihvp["mean_relative_error"] < 1e-8
    assert report.ihvp["scope"] == "all attributed parameters"
    assert [row["method"] for row in report.agreement] == [
        "Exact('hessian') reference", "gradient dot", "gradient cosine"
    ]
    assert report.agreement[0]["spearman"] == pytest.approx(1.0)
    assert [row["damping"] for row in report.damping] == pytest.approx([1e-4, 1e-2])
    assert report.flags == []
    text = str(report)
    for section in ("convergence", "iHVP error", "rank agreement", "top-1 dominance", "damping sensitivity", "flags: none"):
        assert section in text
    data = json.loads(report.to_json(str(tmp_path / "report.json")))
    assert data == report.to_dict() == json.loads((tmp_path / "report.json").read_text())
    assert data["thresholds"]["ihvp_relative_error"] == 0.3


def test_flags_a_planted_dominant_example():
    """A zero-weight linear model: a label-0 training example with a huge input (#7) has the
    largest gradient dot product with every label-0 query, as in the study's failure."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2).to(DT)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    x = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.arange(20) % 2
    x[7], y[7] = 30.0, 0
    queries = [(torch.randn(12, 3, generator=g, dtype=DT).abs(), torch.zeros(12, dtype=torch.long))]
    est = InfluenceEstimator(Identity(), score_dtype=DT).fit(model, batches(x, y, 8))
    report = diagnose(est, queries, k=3, reference=None)
    assert report.dominance["index"] == 7 and report.dominance["share"] == 1.0
    assert any(f.startswith("dominant example: training example #7 is top-1 for 12 of 12") for f in report.flags)
    assert any(f.startswith("not converged") for f in report.flags)
    assert report.ihvp == {"skipped": "reference=None"}
    other = diagnose(est, queries, k=3, reference=None, compare=[InfluenceEstimator(Identity(damping=2.0))])
    assert other.agreement[0]["method"] == "InfluenceEstimator(Identity)"
    assert other.agreement[0]["spearman"] == pytest.approx(1.0)  # damping only rescales Identity
    quiet = diagnose(est, queries, k=3, reference=None, compare=None, thresholds={"dominance_share": 1.01})
    assert not any(f.startswith("dominant") for f in quiet.flags) and quiet.agreement == []


def _under_iterated_lissa():
    LiSSA = getattr(influence, "LiSSA", None)
    if LiSSA is None:
        pytest.skip("influence.LiSSA is not on this branch (it comes with issue 3)")
    lissa = LiSSA(damping=1e-3)
    keys = [k for k in ("depth", "max_iter", "num_iterations", "iterations") if k in lissa.get_params()]
    if not keys:
        pytest.skip(f"cannot find LiSSA's iteration parameter among {sorted(lissa.get_params())}")
    return lissa.set_params(**{keys[0]: 1})


@pytest.mark.parametrize("make", [lambda: DiagonalExact(damping=1e-3), _under_iterated_lissa], ids=["diagonal", "lissa"])
def test_reports_large_ihvp_error_for_a_bad_curvature(trained, make):
    model, train, test = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = InfluenceEstimator(make(), score_dtype=DT).fit(model, train)
        report = diagnose(est, test, k=5, compare=None)
    assert report.ihvp["mean_relative_error"] > 0.3
    assert any(f.startswith("large iHVP error") for f in report.flags)


def test_reference_on_last_module_when_parameters_are_many(monkeypatch):
    model = mlp(d_in=3, hidden=(4,), d_out=2)  # 16 + 10 parameters
    x = torch.randn(10, 3, dtype=DT)
    y = torch.arange(10) % 2
    est = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), score_dtype=DT).fit(model, [(x, y)])
    # with CG: a tight CG on the same curvature (GGN) over all parameters
    report = diagnose(est, [(x[:4], y[:4])], k=2, max_reference_params=12, compare=None)
    assert report.ihvp["reference"].startswith("CG(") and report.ihvp["num_params"] == 26
    assert report.ihvp["mean_relative_error"] < 1e-8
    monkeypatch.delattr(influence.curvature, "CG")  # without: Exact on the last module block
    report = diagnose(est, [(x[:4], y[:4])], k=2, max_reference_params=12, compare=None)
    assert report.ihvp["scope"] == "subset 2" and report.ihvp["num_params"] == 10
    assert report.ihvp["mean_relative_error"] < 1e-8


def test_errors(trained):
    model, train, test = trained
    with pytest.raises(NotFittedError, match=r"call fit\(...\) before diagnose\(\)"):
        diagnose(InfluenceEstimator(), test)
    est = InfluenceEstimator(Exact(damping=1e-3)).fit(model, train)
    with pytest.raises(ValueError, match=r"Unknown thresholds \['dominance'\]"):
        diagnose(est, test, thresholds={"dominance": 0.5})
    with pytest.raises(TypeError, match=r"needs an InfluenceEstimator .* Pass baselines to compare"):
        diagnose(influence.GradientSimilarity().fit(model, train), test)
    with pytest.raises(ValueError, match="Invalid compare 'all'"):
        diagnose(est, test, compare="all")


def test_auto_reference_uses_tight_cg_when_registered(monkeypatch):
    """Stand-in for issue 3's CG: the wiring picks ``influence.curvature.CG`` for large P."""

    class CG(Exact):
        def __init__(self, damping=1e-3, rtol=1e-4, max_iter=10):
            super().__init__(damping=damping, curvature_type="ggn")
            self.rtol, self.max_iter = rtol, max_iter

    monkeypatch.setattr(influence.curvature, "CG", CG, raising=False)
    model = mlp(d_in=3, hidden=(4,), d_out=2)
    x = torch.randn(10, 3, dtype=DT)
    y = torch.arange(10) % 2
    est = InfluenceEstimator(Identity(damping=0.1), score_dtype=DT).fit(model, [(x, y)])
    report = diagnose(est, [(x[:4], y[:4])], k=2, max_reference_params=12, compare=None)
    assert report.ihvp["reference"] == "CG(rtol=1e-10, max_iter=10000)"
    assert report.ihvp["scope"] == "all attributed parameters" and report.ihvp["num_params"] == 26
