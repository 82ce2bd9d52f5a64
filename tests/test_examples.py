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
