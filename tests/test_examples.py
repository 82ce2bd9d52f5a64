"""The examples run (at tiny sizes) and print what they promise."""

import importlib.util
import pathlib

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::influence.exceptions.FallbackWarning")  # LayerNorm: diagonal
def test_token_scores_example_highlights_tokens(capsys):
    out = load("token_scores").main(steps=30, d_model=16, show=2)
    text = capsys.readouterr().out
    tokens, batches = out["tokens"], out["batches"]
    assert tokens.shape[0] == len(out["examples"]) == sum(b["input_ids"].shape[0] for b in batches)
    assert "query: 'tell me the capital of peru ? lima'" in text and text.count("[") >= 4
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    for j, length in enumerate(lengths.tolist()):  # padding positions: exactly zero
        assert not tokens[j, length:].any()
    assert "per-token scores sum to the sequence scores" in text


def test_mislabel_cnn_example_finds_flipped_labels(capsys):
    out = load("mislabel_cnn").main(n_train=160, epochs=25)
    text = capsys.readouterr().out
    assert "self-influence (EK-FAC)" in text and "training loss (baseline)" in text and "FLIPPED" in text
    flipped, self_influence = out["flipped"], out["self_influence"]
    assert self_influence.shape == flipped.shape == (160,) and int(flipped.sum()) == 13
    assert (self_influence > 0).all()  # g·(C + λI)⁻¹g with C + λI positive definite
    assert out["influence"]["auc"] > 0.9 and out["influence"]["precision"] >= 0.5


@pytest.mark.slow  # ~25 s on a busy 2-core machine (GPT-2 pretraining + fine-tuning + 3 methods)
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations
def test_lora_lm_example_attributes_the_adapters(capsys):
    pytest.importorskip("peft")
    out = load("lora_lm").main(pretrain_steps=40, finetune_steps=20, d_model=16, queries_per_family=2)
    text = capsys.readouterr().out
    assert "EK-FAC influence: Acc" in text and "RepSim: Acc" in text and "most helpful fine-tuning examples" in text
    n_train, n_queries = len(out["train"]), len(out["queries"])
    assert (n_train, n_queries) == (34, 8) and out["num_lora_params"] == 2 * 4 * (16 + 3 * 16)  # r(d_in + d_out) per layer
    for name, scores in out["scores"].items():
        assert scores.shape == (n_queries, n_train) and torch.isfinite(scores).all(), name
        assert 0.0 <= out["acc"][name] <= 1.0


@pytest.mark.slow
def test_distributed_example_runs_under_torchrun(tmp_path):
    """Two gloo processes on the CPU, exactly as the example's docstring says to run it."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(EXAMPLES.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "distributed.py"), "--out", str(tmp_path / "run")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scores (4, 101) memmap (4, 101)" in result.stdout
    assert (tmp_path / "run" / "estimator.safetensors").is_file() and (tmp_path / "run" / "scores.npy").is_file()
