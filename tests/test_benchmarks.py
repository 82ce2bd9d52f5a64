"""The benchmarks' smoke sizes run end to end (no timing assertions)."""

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.slow
def test_bench_grads_smoke(tmp_path):
    import bench_grads

    out = bench_grads.run(smoke=True, out_dir=tmp_path)
    assert set(out["results"]) == {"mlp", "cnn", "lm"}
    for r in out["results"].values():
        assert r["max_rel_err_vs_vmap"] < 1e-4
    assert json.loads((tmp_path / "bench_grads_smoke.json").read_text())["smoke"]
    assert (tmp_path / "bench_grads_smoke.md").exists()


@pytest.mark.slow
def test_bench_scoring_smoke(tmp_path):
    import bench_scoring

    out = bench_scoring.run(smoke=True, out_dir=tmp_path, names=("mlp", "lm"), kron=False)
    for case in out["cases"].values():
        for key, row in case.items():
            if isinstance(row, dict) and "exact-materialised" not in key and "LoGra" not in key and "bf16" not in key:
                assert row["pearson_vs_exact"] > 0.99, key
    assert (tmp_path / "bench_scoring_smoke.md").exists()


@pytest.mark.slow
def test_bench_kfac_resnet_smoke(tmp_path):
    import bench_kfac_resnet

    out = bench_kfac_resnet.run(smoke=True, out_dir=tmp_path)
    widest = {row["factor"]: row for row in out["widest_factors"]}
    assert widest["layer4.1.conv1/A"]["non_zero_rows"] <= 16  # 3x3 conv over 1x1 maps: centre taps
    assert (tmp_path / "bench_kfac_resnet_smoke.md").exists()


@pytest.mark.slow
def test_bench_product_modes_smoke(tmp_path):
    import bench_product_modes

    out = bench_product_modes.run(smoke=True, out_dir=tmp_path)
    assert {r["curvature_type"] for r in out["rows"]} == {"ggn", "hessian"}
    assert all(r["max_rel_diff"] < 1e-5 for r in out["rows"])  # the two modes agree
    assert (tmp_path / "bench_product_modes_smoke.md").exists()


@pytest.mark.slow
def test_bench_tied_smoke(tmp_path):
    pytest.importorskip("transformers")
    import bench_tied

    out = bench_tied.run(smoke=True, out_dir=tmp_path)
    (result,) = out["results"].values()
    assert max(result["max_rel_err_vs_all_func"].values()) < 1e-5 and result["self_scores_max_rel_err"] < 1e-5
    assert result["func_layout"] is None and result["coverage_wte"]["path"] == "hooks"  # no vmap pass
    assert (tmp_path / "bench_tied_smoke.md").exists()


@pytest.mark.slow
def test_bench_memory_smoke(tmp_path):
    import bench_memory

    out = bench_memory.run(smoke=True, out_dir=tmp_path)
    plain, budget = out["results"]
    assert plain["query_groups"] == 1 and budget["query_groups"] > 1
    assert budget["resident_query_mb"] * (1 << 20) <= 64 << 10
    assert abs(plain["checksum"] - budget["checksum"]) <= 1e-5 * plain["checksum"]
    assert (tmp_path / "bench_memory_smoke.md").exists()


@pytest.mark.slow
def test_bench_plan_smoke(tmp_path):
    import bench_plan

    out = bench_plan.run(smoke=True, out_dir=tmp_path)
    (result,) = out["results"].values()
    assert set(result["seconds"]) == {"plan", "plan + self-check", "stochasticity check", "one batch"}
    assert result["hook_layers"] == 3  # the MLP's three Linear layers stay on the hook path
    assert (tmp_path / "bench_plan_smoke.md").exists()


@pytest.mark.slow
def test_bench_decompose_smoke(tmp_path):
    import bench_decompose

    out = bench_decompose.run(smoke=True, out_dir=tmp_path)
    for label, result in out["results"].items():
        assert result["max_rel_diff"]["per_module"] < 1e-5 and result["max_rel_diff"]["per_token"] < 1e-5, label
    assert out["results"]["identity"]["max_rel_diff"]["aggregate"] < 1e-5
    assert (tmp_path / "bench_decompose_smoke.md").exists()
