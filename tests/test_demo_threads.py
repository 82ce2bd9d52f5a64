"""``influence demo`` runs with one intra-op thread unless ``--threads`` says otherwise, and
restores torch's setting when it returns (issue 17.6; measured in bench_busy_demo.md)."""

import pytest
import torch

import influence.demo.pipeline as pipeline
from influence import cli
from influence.cli import main

TINY = ["demo", "--task", "math", "--methods", "identity", "repsim", "--epochs", "1", "--no-progress"]


@pytest.fixture
def threads_seen(monkeypatch, tmp_path):
    """Records ``torch.get_num_threads()`` inside each demo run (stand-ins for the run and the
    report keep it fast); torch starts at 2 threads and is reset afterwards."""
    import influence.demo.report as report

    seen = []

    def run_demo(config, **kwargs):
        seen.append(torch.get_num_threads())
        return {"config": config}

    monkeypatch.setattr(pipeline, "run_demo", run_demo)
    monkeypatch.setattr(report, "summary", lambda results: "Acc (stand-in)")
    monkeypatch.setattr(report, "write_report", lambda results, out: tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield seen
    torch.set_num_threads(before)


def test_demo_uses_one_thread_by_default_and_restores_torchs_setting(tmp_path, threads_seen, capsys):
    args = TINY + ["--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert getattr(cli, "DEMO_THREADS", None) == 1 and threads_seen == [1]
    assert torch.get_num_threads() == 2  # restored: main() may be called from a library
    assert main(args + ["--threads", "3"]) == 0 and threads_seen[-1] == 3
    assert main(args + ["--threads", "0"]) == 0 and threads_seen[-1] == 2  # 0: torch's setting
    assert torch.get_num_threads() == 2
    assert "Acc" in capsys.readouterr().out


def test_threads_are_restored_when_the_run_fails(tmp_path, threads_seen, monkeypatch):
    monkeypatch.setattr(pipeline, "run_demo", lambda *a, **k: (threads_seen.append(torch.get_num_threads()),
                                                              1 / 0))
    with pytest.raises(ZeroDivisionError):
        main(TINY + ["--out", str(tmp_path / "out")])
    assert threads_seen == [1] and torch.get_num_threads() == 2


def test_negative_or_non_integer_threads_are_refused(capsys, threads_seen):
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit):
            main(["demo", "--threads", bad])
        assert f"invalid thread count '{bad}': expected an integer >= 1, or 0 for torch's default" in capsys.readouterr().err
    assert threads_seen == []  # refused before anything ran
