"""The demo pipeline end to end at a tiny size, its method registry, metrics and CLI."""

import json

import pytest
import torch

import influence
from influence.cli import main
from influence.demo.methods import METHODS, check_methods
from influence.demo.metrics import chance, class_metrics
from influence.demo.pipeline import DemoConfig, run_demo
from influence.demo.pretrain import PretrainConfig, pretrain
from influence.demo.report import summary, write_report

TINY_LM = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, steps=30, batch_size=16)


def tiny_config(**kw):
    base = dict(tasks=("harmful", "backdoor_multi"), methods=("identity", "exact", "repsim", "datainf"),
                scale=0.03, n_queries=6, epochs=2, checkpoints=(1,), pretrain=PretrainConfig(**TINY_LM))
    base.update(kw)
    return DemoConfig(**base)


def test_metrics_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    train, test = [0, 0, 1, 1], [0, 0]
    metrics = class_metrics(scores, train, test)
    assert metrics["acc"] == 0.5
    assert metrics["cover"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["auc"] == pytest.approx((0.75 + 0.0) / 2)
    assert chance(train, test) == 0.5


def test_pretrain_is_cached(tmp_path):
    config = PretrainConfig(**{**TINY_LM, "steps": 3})
    _, _, first = pretrain(config, tmp_path, progress=False)
    model, tok, second = pretrain(config, tmp_path, progress=False)
    assert not first["cached"] and second["cached"]
    assert first["cache"] == second["cache"] and model.config.vocab_size == len(tok)


def test_a_changed_cached_base_model_is_not_used(tmp_path):
    """The cache is untrusted input: weights edited in place fail the checksum stored beside
    them, and the base model is pretrained again instead of silently changing every score."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = PretrainConfig(**{**TINY_LM, "steps": 3})
    model, _, first = pretrain(config, tmp_path, progress=False)
    with safe_open(first["cache"], "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(state)[0]
    state[name] = state[name] + 1.0
    save_file(state, first["cache"], metadata=meta)
    with pytest.warns(UserWarning, match="does not match its checksum"):
        again, _, info = pretrain(config, tmp_path, progress=False)
    assert not info["cached"]
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k  # the retrained weights, not the edited ones


def test_pretrain_cache_key_follows_the_tokenizer_and_the_corpus(tmp_path):
    import dataclasses

    from influence.demo.data import Example

    config = PretrainConfig(**{**TINY_LM, "steps": 2})
    _, tok, first = pretrain(config, tmp_path, progress=False)
    _, small, other = pretrain(dataclasses.replace(config, vocab_size=50), tmp_path, progress=False)
    assert len(small) == 50 < len(tok) and not other["cached"] and other["cache"] != first["cache"]
    corpus = [Example("how are you ?", "fine, thanks!", "greeting"), "a plain sentence ."]
    model, tok_c, c = pretrain(config, tmp_path, progress=False, corpus=corpus)
    assert not c["cached"] and model.config.vocab_size == len(tok_c) == 5 + 12  # specials + 12 distinct words and marks
    assert tok_c.tokens("fine, thanks!") == ["fine", ",", "thanks", "!"]
    assert tok_c.encode("unseen words") == [tok_c.unk_id] * 2
    again = pretrain(config, tmp_path, progress=False, corpus=corpus)[2]
    assert again["cached"] and again["cache"] == c["cache"]
    # the same words (the same tokenizer) in other texts: other weights, never the stale file
    swapped = [Example("fine, thanks!", "how are you ?", "greeting"), "a plain sentence ."]
    _, tok_s, s = pretrain(config, tmp_path, progress=False, corpus=swapped)
    assert tok_s.digest() == tok_c.digest() and not s["cached"] and s["cache"] != c["cache"]
    with pytest.raises(ValueError, match="corpus must be a non-empty sequence"):
        pretrain(config, tmp_path, progress=False, corpus=[1, 2])


def test_whole_pipeline_tiny(tmp_path):
    results = run_demo(tiny_config(), cache_dir=tmp_path, progress=False, log=lambda s: None)
    assert [t["task"] for t in results["tasks"]] == ["harmful", "backdoor_multi"]
    for t in results["tasks"]:
        for name in ("identity", "exact", "repsim"):
            entry = t["methods"][name]
            assert entry["status"] == "ok", entry
            assert 0 <= entry["acc"] <= 1 and 0 <= entry["cover"] <= 1 and 0 <= entry["auc"] <= 1
        assert t["methods"]["datainf"]["status"] == "ok"
        assert t["num_lora_params"] == 2 * 2 * 4 * 16  # q and v of one layer, r = 4
        assert set(t["ihvp_error"]) >= {"identity"}
        assert [h["epoch"] for h in t["epochs"]] == [1, 2] and "methods" in t["epochs"][0]
    out = write_report(results, tmp_path / "report")
    assert {"report.md", "results.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "results.json").read_text())["tasks"][0]["task"] == "harmful"
    assert "Acc" in summary(results)


def test_pipeline_runs_on_a_peft_lora_model(tmp_path):
    pytest.importorskip("peft")
    config = tiny_config(tasks=("math",), methods=("identity", "ekfac", "repsim"), epochs=1,
                         checkpoints=(), lora_backend="peft")
    results = run_demo(config, cache_dir=tmp_path, progress=False, log=lambda s: None)
    task = results["tasks"][0]
    assert task["num_lora_params"] == 2 * 2 * 4 * 16
    assert all(task["methods"][m]["status"] == "ok" for m in ("identity", "ekfac", "repsim")), task["methods"]


def test_registry_builds_the_library_classes(tmp_path):
    built = METHODS["lissa_paper"].build(0.5, "fisher")
    assert isinstance(built, influence.LiSSA) and built.depth == 3 and built.variant == "paper"
    assert built.damping == "datainf" and built.curvature_type == "fisher"
    assert isinstance(METHODS["ekfac"].build(0.5, "fisher"), influence.EKFAC)
    assert METHODS["repsim"].kind == "repsim" and METHODS["cg"].kind == "curvature"
    config = tiny_config(tasks=("math",), methods=("exact", "cg"), epochs=1, checkpoints=())
    results = run_demo(config, cache_dir=tmp_path, progress=False, log=lambda s: None)
    err = results["tasks"][0]["ihvp_error"]["cg"]  # CG on the exact curvature converges to it
    assert err["relative_error"] < 1e-4 and err["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="Unknown method.*Supported"):
        check_methods(["nope"])
    with pytest.raises(ValueError, match="Unknown task.*Supported"):
        run_demo(tiny_config(tasks=("nope",)), progress=False)


def test_cli_demo(tmp_path, capsys):
    code = main(["demo", "--task", "math", "--methods", "identity", "repsim", "cg", "--epochs", "1",
                 "--scale", "0.02", "--queries", "4", "--pretrain-steps", "5", "--cache", str(tmp_path),
                 "--out", str(tmp_path / "out")])
    assert code == 0
    captured = capsys.readouterr()
    assert "Acc" in captured.out and "report written" in captured.out
    assert "\r" not in captured.err  # stderr is not a terminal: no progress bars by default
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## What the tables show" in report and "RepSim averages Acc" in report
    if (tmp_path / "out" / "acc_by_method.png").exists():
        assert "](acc_by_method.png)" in report and "](quality_vs_epochs.png)" in report


def test_cli_help_is_plain_text_and_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "::" not in text  # no raw reST
    assert "examples:" in text and "influence demo --quick" in text
    import argparse

    from influence.cli import _demo_parser

    sub = argparse.ArgumentParser().add_subparsers()
    _demo_parser(sub)
    actions = [a for a in sub.choices["demo"]._actions if a.option_strings]
    assert {"--quick", "--seed", "--progress", "--no-progress"} <= {o for a in actions for o in a.option_strings}
    assert all(a.help and a.help.strip() for a in actions), [a.option_strings for a in actions if not a.help]


def test_cli_control_options_reach_the_config():
    import argparse

    from influence.cli import _demo_parser, demo_config

    parser = argparse.ArgumentParser()
    _demo_parser(parser.add_subparsers())
    default = demo_config(parser.parse_args(["demo", "--quick"]))
    assert default.controls and default.control_init == "random"
    assert "lissa" not in default.control_methods and "exact" in default.control_methods
    config = demo_config(parser.parse_args(["demo", "--no-controls", "--control-init", "base",
                                            "--control-methods", "lissa", "identity"]))
    assert not config.controls and config.control_init == "base"
    assert config.control_methods == ("lissa", "identity")
    with pytest.raises(ValueError, match="Invalid control_init 'nope'. Supported"):
        run_demo(tiny_config(control_init="nope"), progress=False)
