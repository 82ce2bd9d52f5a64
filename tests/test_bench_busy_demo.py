"""The smoke size of benchmarks/bench_busy_demo.py runs end to end (no timing assertions)."""

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_bench_busy_demo_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_busy_demo

    out = bench_busy_demo.main(["--quick", "--out-dir", str(tmp_path)])
    (row,) = out["rows"]
    assert row["status"] == "ok" and row["seconds"] > 0 and row["threads"] == 1
    assert "| pretrain | idle | 1 | default | 1 |" in (tmp_path / "bench_busy_demo_smoke.md").read_text()
