"""The study's output folder and terminal summary.

``write_outputs(result, out)`` writes:

- ``results.json``: configuration, model, data sizes, chance levels, fine-tuning losses, and
  per method ``acc``, ``cover``, ``auc`` and ``seconds`` (``methods``), and the same for each
  control (``controls``);
- ``report.md``: the tables (and ``acc_by_method.png`` when matplotlib is installed);
- ``scores/<method>.npy``: ``(n_queries, n_train)`` float64 scores on the fine-tuned model,
  positive = helpful; ``scores/<control>/<method>.npy`` for the controls;
- ``top_examples.jsonl``: one line per (method, query): the query and its 5 highest-scoring
  training examples with their text, label and score;
- ``adapter/``: the fine-tuned LoRA adapter (peft ``save_pretrained``; reuse it with
  ``--adapter``), for a HuggingFace model that was fine-tuned by the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..demo.methods import METHODS
from ..demo.report import markdown_table, text_table

ROWS = (("fine-tuned", None), ("control: before fine-tuning", "before_finetuning"),
        ("control: swapped response", "swapped_response"))
METRICS = (("acc", "Acc (the top-1 training example has the query's class)"),
           ("cover", "Cover (same-class fraction of the top k, k = n_train / n_classes)"),
           ("auc", "AUC (same-class vs other training examples; chance 0.5)"))


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _cell(entry: dict | None, key: str) -> str:
    if entry is None:
        return ""
    return _fmt(entry.get(key)) if entry.get("status") == "ok" else "fail"


def metric_table(results: dict, key: str) -> list[list[str]]:
    """Rows ``[setting, chance, method...]`` of one metric (header first)."""
    methods = [m for m in METHODS if m in results["methods"]]
    rows = [["", "chance", *methods]]
    for title, control in ROWS:
        entries = results["methods"] if control is None else results["controls"].get(control)
        if entries is not None:
            rows.append([title, _fmt(results["chance"][key]), *[_cell(entries.get(m), key) for m in methods]])
    return rows


def seconds_table(results: dict) -> list[list[str]]:
    methods = [m for m in METHODS if m in results["methods"]]
    return [["", *methods], ["seconds (fit + scoring)",
                             *[_cell(results["methods"][m], "seconds") for m in methods]]]


def not_run(results: dict) -> dict[str, str]:
    return {m: e["reason"] for m, e in results["methods"].items() if e.get("status") != "ok"}


def summary(results: dict) -> str:
    """The terminal summary: one table per metric, failed methods, total time."""
    parts = []
    for key, title in METRICS:
        parts += [title, text_table(metric_table(results, key)), ""]
    parts += [text_table(seconds_table(results)), ""]
    parts += [f"{m}: failed: {why}" for m, why in not_run(results).items()]
    parts.append(f"total {results['seconds']:.0f} s")
    return "\n".join(parts)


READING = """\
Ground truth: a training example explains a query when it has the query's class. Scores are
on the LoRA parameters; positive = helpful. **Acc**: fraction of queries whose top-scored
training example has the query's class. **Cover**: same-class fraction of each query's top k
(k = n_train / n_classes). **AUC**: how well a query's scores separate same-class from other
training examples. Compare every number with its chance level and with the control rows:

- **before fine-tuning**: the same method on the model before fine-tuning (fresh adapters;
  the built-in TinyLM at random initialisation). What a method reaches here does not come from
  what fine-tuning taught the model; it comes from surface overlap, typically the query
  sharing its response (answer) tokens with its class's training examples.
- **swapped response**: the fine-tuned model, each query's response replaced by the response
  of a query of another class; scored against the query's own class. A method that only
  matches answer tokens drops towards 0 here (`acc_other_class` in results.json is its Acc
  against the class the swapped-in response came from).

A method shows attribution beyond answer matching only where its fine-tuned row clearly beats
the before-fine-tuning row and chance."""


def report_markdown(results: dict, plot: bool) -> str:
    data, model, ft = results["data"], results["model"], results["finetune"]
    md = ["# influence study", "",
          f"Model: {model.get('name', 'built-in TinyLM')} ({model['num_params']:,} parameters, "
          f"{model['num_lora_params']:,} LoRA parameters attributed). Data: {data['n_train']} "
          f"training examples, {data['n_queries']} queries (of {data['n_test']} test examples), "
          f"{len(data['classes'])} classes. Loss: {results['config']['loss']}. "
          f"Total time {results['seconds']:.0f} s.", "", "## What the tables show", "", READING, ""]
    if plot:
        md += ["![Acc by method](acc_by_method.png)", ""]
    for key, title in METRICS:
        md += [f"## {title}", "", markdown_table(metric_table(results, key)), ""]
    md += ["## Time", "", markdown_table(seconds_table(results)), ""]
    if ft["skipped"]:
        md += ["## Fine-tuning", "", f"Skipped: the adapter {results['config']['adapter']} was "
               "attributed as loaded.", ""]
    else:
        rows = [["epoch", "train loss / token", "query loss / token"]] + [
            [str(h["epoch"]), f"{h['train_loss']:.4f}", f"{h['query_loss']:.4f}"] for h in ft["epochs"]]
        md += ["## Fine-tuning", "", f"AdamW, lr {ft['lr']:g}.", "", markdown_table(rows), ""]
    missing = not_run(results)
    if missing:
        md += ["## Failed", ""] + [f"- `{m}`: {why}" for m, why in missing.items()] + [""]
    md += ["## Configuration", "", "```json", json.dumps(results["config"], indent=2, default=str),
           "```", ""]
    return "\n".join(md)


def write_outputs(result, out: str | Path, save_adapter: bool = False) -> Path:
    """Writes the folder described in the module docstring; returns its path."""
    out = Path(out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    results = result.results
    for method, S in result.scores.items():
        np.save(out / "scores" / f"{method}.npy", S)
    for control, by_method in result.control_scores.items():
        (out / "scores" / control).mkdir(exist_ok=True)
        for method, S in by_method.items():
            np.save(out / "scores" / control / f"{method}.npy", S)
    with open(out / "top_examples.jsonl", "w", encoding="utf-8") as f:
        for method in result.scores:
            for line in result.top_examples(method, k=5):
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot = _plot(results, out)
    (out / "report.md").write_text(report_markdown(results, plot))
    if save_adapter and hasattr(result.model, "save_pretrained"):
        result.model.save_pretrained(str(out / "adapter"))
    return out


def _plot(results: dict, out: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if results["methods"].get(m, {}).get("status") == "ok"]
    if not methods:
        return False
    rows = [(t, results["methods"] if c is None else results["controls"].get(c)) for t, c in ROWS]
    rows = [(t, e) for t, e in rows if e is not None]
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(methods), 3.6))
    width = 0.8 / len(rows)
    for i, (title, entries) in enumerate(rows):
        ys = [entries[m]["acc"] if entries.get(m, {}).get("status") == "ok" else float("nan")
              for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], ys, width, label=title)
    ax.axhline(results["chance"]["acc"], color="k", lw=0.8, ls=":", label="chance")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Acc (top-1)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "acc_by_method.png", dpi=120)
    plt.close(fig)
    return True
