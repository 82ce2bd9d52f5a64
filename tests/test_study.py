"""``influence study`` end to end on generated data and tiny saved HuggingFace models (offline).

Needs the optional extras (``pip install "influence-estimation[study]"``: datasets,
transformers, peft); skipped when they are not importable. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from study_fixtures import rows, save_tiny_model, write_data, write_split  # noqa: E402

from influence import evaluation  # noqa: E402
from influence.cli import main  # noqa: E402
from influence.demo.pretrain import PretrainConfig  # noqa: E402
from influence.study import LoraSettings, StudyConfig, find_targets, read_split, run_study, swap_responses  # noqa: E402
from influence.study.batches import make_batches  # noqa: E402
from influence.study.data import Record  # noqa: E402

METHODS = "identity,datainf,lissa_paper,repsim"
OUTPUTS = {"results.json", "report.md", "top_examples.jsonl", "scores", "adapter"}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return {"llama": save_tiny_model(root / "llama", "llama"),
            "gpt2": save_tiny_model(root / "gpt2", "gpt2"),
            "jsonl": write_data(root / "jsonl", "jsonl"), "root": root}


@pytest.fixture(scope="session")
def cli_run(tiny):
    """The issue's command on the jsonl fixture and the saved tiny Llama."""
    out = tiny["root"] / "out"
    assert main(["study", "--data", str(tiny["jsonl"]), "--model", str(tiny["llama"]), "--methods",
                 METHODS, "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    return out


def check_outputs(out, n_test, n_train, methods=METHODS.split(","), controls=True):
    """Every output file exists with the right shapes, and the metrics match the scores."""
    assert OUTPUTS - {"adapter"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    data = results["data"]
    assert data["n_queries"] == n_test and data["n_train"] == n_train
    config = results["config"]
    train_labels = [r.label for r in read_split(config["data"], "train", config["fields"])]
    test_labels = [r.label for r in read_split(config["data"], "test", config["fields"])]
    query_labels = [test_labels[i] for i in data["query_indices"]]
    for m in methods:
        S = np.load(out / "scores" / f"{m}.npy")
        assert S.shape == (n_test, n_train) and np.isfinite(S).all()
        entry = results["methods"][m]
        assert entry["status"] == "ok" and entry["seconds"] > 0
        # the metrics are influence.evaluation's, on the saved matrix, with the string labels
        assert entry["acc"] == pytest.approx(evaluation.top1_accuracy(S, train_labels, query_labels))
        assert entry["cover"] == pytest.approx(evaluation.cover(S, train_labels, query_labels))
        same = np.array(query_labels)[:, None] == np.array(train_labels)[None, :]
        assert entry["auc"] == pytest.approx(evaluation.roc_auc(S, same))
        if controls:
            for control in ("before_finetuning", "swapped_response"):
                C = np.load(out / "scores" / control / f"{m}.npy")
                assert C.shape == (n_test, n_train) and np.isfinite(C).all()
                assert results["controls"][control][m]["status"] == "ok"
    shares = [np.mean(np.array(train_labels) == y) for y in query_labels]
    assert results["chance"]["acc"] == pytest.approx(np.mean(shares)) and results["chance"]["auc"] == 0.5
    lines = [json.loads(line) for line in (out / "top_examples.jsonl").read_text().splitlines()]
    assert len(lines) == len(methods) * n_test
    for line in lines:
        S = np.load(out / "scores" / f"{line['method']}.npy")
        i = data["query_indices"].index(line["query"]["index"])
        assert line["query"]["label"] == query_labels[i]
        top = [t["index"] for t in line["top"]]
        assert len(top) == 5 and top[0] == int(np.argmax(S[i]))
        assert [t["score"] for t in line["top"]] == sorted((t["score"] for t in line["top"]), reverse=True)
        assert all(t["label"] == train_labels[t["index"]] for t in line["top"])
    assert "| fine-tuned |" in (out / "report.md").read_text()
    return results


# ----------------------------------------------------------------------------- data
def test_the_three_formats_read_the_same_records(tmp_path):
    fields = ("prompts", "response", "variation")  # the study's own field names
    for fmt in ("arrow", "jsonl", "csv"):
        write_data(tmp_path / fmt, fmt, fields=fields)
    read = {fmt: read_split(tmp_path / fmt, "train", fields) for fmt in ("arrow", "jsonl", "csv")}
    assert read["arrow"] == read["jsonl"] == read["csv"]
    assert read["csv"][0] == Record(rows(6, 0)[0]["prompt"], rows(6, 0)[0]["response"],
                                    rows(6, 0)[0]["label"], 0)


def test_labels_compare_as_text_and_class_label_names(tmp_path):
    import datasets

    (tmp_path / "c").mkdir()  # a csv saved by a spreadsheet starts with a byte-order mark
    (tmp_path / "c" / "train.csv").write_bytes("\ufeffprompt,response,label\nx,y,1\n".encode())
    assert read_split(tmp_path / "c", "train")[0] == Record("x", "y", "1", 0)

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").write_text('{"prompt": "x", "response": "y", "label": 1}\n')
    features = datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"prompt": ["a"], "response": ["b"], "label": [1]},
                               features=features).save_to_disk(str(tmp_path / "b" / "train"))
    assert read_split(tmp_path / "a", "train")[0].label == "1"
    assert read_split(tmp_path / "b", "train")[0].label == "pos"


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_split(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match=r"No 'train' split .* train.jsonl or train.csv"):
        read_split(tmp_path, "train")
    write_split(tmp_path, "train", rows(2, 0), "jsonl")
    write_split(tmp_path, "train", rows(2, 0), "csv")
    with pytest.raises(ValueError, match="ambiguous.*Keep exactly one"):
        read_split(tmp_path, "train")
    (tmp_path / "train.csv").unlink()
    with pytest.raises(ValueError, match=r"no field\(s\) \['text'\].*--fields"):
        read_split(tmp_path, "train", ("text", "response", "label"))
    with pytest.raises(ValueError, match="three columns"):
        read_split(tmp_path, "train", "prompt,response")
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="'test' split .* has no rows"):
        read_split(tmp_path, "test")
    (tmp_path / "test.jsonl").write_text('{"prompt": "a", "response": "", "label": "x"}\n')
    with pytest.raises(ValueError, match="row 0: the response is empty"):
        read_split(tmp_path, "test")
    (tmp_path / "test.jsonl").write_text('{"prompt": null, "response": "b", "label": "x"}\n')
    with pytest.raises(ValueError, match=r"row 0: the prompt is empty \(null\)"):
        read_split(tmp_path, "test")
    (tmp_path / "test.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1 is a JSON list; expected one object"):
        read_split(tmp_path, "test")


def test_arrow_without_datasets_names_the_extra(tmp_path, monkeypatch):
    write_split(tmp_path, "train", rows(1, 0), "arrow")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"influence-estimation\[study\]"):
        read_split(tmp_path, "train")


def test_query_classes_must_exist_in_training(tmp_path, tiny):
    write_split(tmp_path, "train", [r for r in rows(3, 0) if r["label"] != "fear"], "jsonl")
    write_split(tmp_path, "test", rows(1, 1), "jsonl")
    with pytest.raises(SystemExit, match=r"Query label\(s\) \['fear'\] have no training examples"):
        main(["study", "--data", str(tmp_path), "--model", str(tiny["llama"]), "--out", str(tmp_path / "o")])
    write_split(tmp_path, "train", [r for r in rows(3, 0) if r["label"] == "fear"], "jsonl")
    with pytest.raises(SystemExit, match=r"1 class\(es\).*needs at least two"):
        main(["study", "--data", str(tmp_path), "--model", str(tiny["llama"]), "--out", str(tmp_path / "o")])


def test_bad_options_get_clear_errors(tiny, tmp_path):
    data = str(tiny["jsonl"])
    with pytest.raises(SystemExit, match=r"Unknown method\(s\) \['gradmatch'\]"):
        main(["study", "--data", data, "--methods", "identity,gradmatch"])
    with pytest.raises(SystemExit, match="--adapter needs --model"):
        main(["study", "--data", data, "--adapter", str(tmp_path)])
    with pytest.raises(SystemExit, match="epochs must be an integer >= 1"):
        main(["study", "--data", data, "--epochs", "0"])
    with pytest.raises(SystemExit, match="Could not load --model"):
        main(["study", "--data", data, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # argparse: --loss has two choices
        main(["study", "--data", data, "--loss", "prompt"])


def test_help_is_plain_text_and_explains_every_option(capsys):
    import argparse

    from influence.study.cli import study_parser

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "::" not in text  # no raw reST
    assert "examples:" in text and "influence study --data my_data" in text
    sub = argparse.ArgumentParser().add_subparsers()
    study_parser(sub)
    actions = [a for a in sub.choices["study"]._actions if a.option_strings]
    options = {o for a in actions for o in a.option_strings}
    assert {"--data", "--model", "--adapter", "--fields", "--loss", "--methods", "--queries", "--epochs",
            "--lr", "--batch-size", "--lora-targets", "--lora-layers", "--device", "--dtype", "--out",
            "--progress", "--no-progress"} <= options
    assert all(a.help and a.help.strip() for a in actions), [a.option_strings for a in actions if not a.help]


# ----------------------------------------------------------------------------- pieces
def test_losses_label_the_response_or_everything(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    records = read_split(tiny["jsonl"], "train")[:4]
    resp = make_batches(tok, records, 4, "response", 64)[0]
    full = make_batches(tok, records, 4, "full", 64)[0]
    assert torch.equal(resp["input_ids"], full["input_ids"]) and torch.equal(full["labels"], full["input_ids"])
    for i, r in enumerate(records):  # response labels: the response word and <eos>, nothing else
        target = resp["labels"][i][resp["labels"][i] != -100].tolist()
        assert target == tok(" " + r.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert resp["input_ids"][0, 0] == tok.bos_token_id
    short = make_batches(tok, records, 4, "response", 5)[0]  # the prompt is cut, the response kept
    assert short["input_ids"].shape[1] == 5 and (short["labels"][:, -2:] != -100).all()


def test_lora_targets_are_the_query_value_projections(tiny):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny["gpt2"])
    assert find_targets(llama) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert find_targets(gpt2) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert find_targets(llama, layers=[1]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert find_targets(llama, targets=["k_proj", "*.0.mlp.down_proj"]) == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"]
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] do not exist; .* layers \[0, 1\]"):
        find_targets(llama, layers=[1, 5])
    with pytest.raises(ValueError, match=r"--lora-targets \['qq'\] matched no Linear/Conv1D"):
        find_targets(llama, targets=["qq"])


def test_swapped_queries_get_another_class_response():
    queries = read_split_like(rows(2, 1))
    swapped, donors = swap_responses(queries, pool=queries, seed=3)
    by_response = {q.response: q.label for q in queries}
    for q, s, d in zip(queries, swapped, donors):
        assert s.prompt == q.prompt and s.label == q.label and by_response[s.response] == d != q.label
    assert swap_responses(queries, pool=queries, seed=3) == (swapped, donors)  # seeded
    only_joy = [q for q in queries if q.label == "joy"]
    swapped, donors = swap_responses(only_joy, pool=queries)  # responses from the pool
    assert all(d != "joy" for d in donors)
    with pytest.raises(ValueError, match="class 'joy', the only class in the pool"):
        swap_responses(only_joy, pool=only_joy)


def read_split_like(data):
    return [Record(r["prompt"], r["response"], r["label"], i) for i, r in enumerate(data)]


# ----------------------------------------------------------------------------- end to end
def test_cli_on_jsonl_and_llama_writes_every_output(cli_run):
    results = check_outputs(cli_run, n_test=6, n_train=18)
    assert results["model"]["lora_modules"] == [f"base_model.model.model.layers.{i}.self_attn.{p}"
                                                 for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert results["model"]["num_lora_params"] == 2 * (4 * (16 + 16) + 4 * (16 + 8))  # q: 16->16, v: 16->8
    assert len(results["finetune"]["epochs"]) == 1 and not results["finetune"]["skipped"]
    assert set(results["timings"]) == {"load", "control_before_finetuning", "finetune", "attribution"}
    # the responses are the class names: gradient match follows the answer token, and the
    # swapped-response control exposes it
    swapped = results["controls"]["swapped_response"]["identity"]
    assert swapped["acc_other_class"] > swapped["acc"]
    assert (cli_run / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["arrow", "csv"])
def test_cli_on_arrow_and_csv(fmt, tiny, tmp_path):
    data = write_data(tmp_path / "data", fmt, fields=("prompts", "response", "variation"))
    out = tmp_path / "out"
    assert main(["study", "--data", str(data), "--model", str(tiny["llama"]), "--methods", METHODS,
                 "--epochs", "1", "--out", str(out), "--fields", "prompts,response,variation",
                 "--queries", "4", "--no-progress"]) == 0
    check_outputs(out, n_test=4, n_train=18)


@pytest.mark.slow
def test_gpt2_gets_lora_on_c_attn(tiny, tmp_path):
    result = run_study(StudyConfig(data=str(tiny["jsonl"]), model=str(tiny["gpt2"]), epochs=1,
                                   methods=("identity", "repsim"), out=str(tmp_path), controls=False))
    assert result.results["model"]["lora_modules"] == [
        f"base_model.model.transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    assert result.results["model"]["num_lora_params"] == 2 * 4 * (16 + 48)
    check_outputs(tmp_path, 6, 18, methods=["identity", "repsim"], controls=False)


def test_adapter_is_attributed_without_fine_tuning(cli_run, tiny, tmp_path, monkeypatch):
    import influence.study.run as study_run

    adapter = cli_run / "adapter"
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()

    def no_training(*args, **kwargs):
        raise AssertionError("--adapter must not fine-tune")

    monkeypatch.setattr(study_run, "finetune_epoch", no_training)
    result = run_study(StudyConfig(data=str(tiny["jsonl"]), model=str(tiny["llama"]), adapter=str(adapter),
                                   methods=("identity", "datainf"), out=str(tmp_path), controls=False))
    assert result.results["finetune"] == {"skipped": True, "lr": None, "epochs": []}
    # the loaded adapter is the fine-tuned one: the same scores as the run that trained it
    for m in ("identity", "datainf"):
        np.testing.assert_allclose(result.scores[m], np.load(cli_run / "scores" / f"{m}.npy"), rtol=1e-4)
    assert hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest() == digest
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(ValueError, match="does not fit GPT2LMHeadModel.* Pass the base model"):
        run_study(StudyConfig(data=str(tiny["jsonl"]), model=str(tiny["gpt2"]), adapter=str(adapter)))


def test_full_loss_changes_the_scores(tiny, cli_run):
    def identity(loss):
        config = StudyConfig(data=str(tiny["jsonl"]), model=str(tiny["llama"]), epochs=1, loss=loss,
                             methods=("identity",), controls=False)
        return run_study(config, log=lambda s: None)

    response, full = identity("response"), identity("full")
    # the controls (skipped here) leave the fine-tuned model and its scores as they were
    np.testing.assert_allclose(response.scores["identity"], np.load(cli_run / "scores" / "identity.npy"),
                               rtol=1e-5)
    assert response.scores["identity"].shape == full.scores["identity"].shape == (6, 18)
    assert not np.allclose(response.scores["identity"], full.scores["identity"], rtol=0.1)
    # the full loss counts every token: prompt and padding too
    assert full.results["finetune"]["epochs"][0]["train_loss"] != response.results["finetune"]["epochs"][0]["train_loss"]


@pytest.mark.slow
def test_builtin_tinylm_without_model(tiny, tmp_path):
    (tmp_path / "data").mkdir()
    write_split(tmp_path / "data", "train", rows(6, 0), "jsonl")
    test = rows(2, 1)
    test[0] = {**test[0], "prompt": test[0]["prompt"] + " zebra !"}  # words never seen in training
    write_split(tmp_path / "data", "test", test, "jsonl")
    config = StudyConfig(data=str(tmp_path / "data"), methods=("identity", "repsim"), epochs=2,
                         pretrain=PretrainConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, steps=20),
                         lora=LoraSettings(r=2), out=str(tmp_path / "out"))
    result = run_study(config, log=lambda s: None)
    assert result.results["model"]["kind"] == "tinylm"
    assert result.results["model"]["num_lora_params"] == 2 * 2 * (16 + 16)  # q and v of one layer, r = 2
    assert result.tokenizer.unk_token_id in result.tokenizer("zebra")["input_ids"]
    check_outputs(tmp_path / "out", 6, 18, methods=["identity", "repsim"])
    assert not (tmp_path / "out" / "adapter").exists()
