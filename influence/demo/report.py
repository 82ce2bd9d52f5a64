"""The demo's report: a text table for the terminal, and a folder with markdown, JSON and plots.

``write_report(results, out)`` writes ``results.json`` (everything), ``report.md`` (the tables)
and, when matplotlib is installed, ``acc_by_method.png`` and ``quality_vs_epochs.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .methods import METHODS


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _cell(entry: dict | None, key: str) -> str:
    if entry is None:
        return ""
    if entry.get("status") != "ok":
        return "fail"
    return _fmt(entry.get(key))


def _methods_run(results: dict) -> list[str]:
    seen = {m for t in results["tasks"] for m in t["methods"]}
    return [m for m in METHODS if m in seen]


CONTROLS = ("before_finetuning", "swapped_responses")
"""The control rows (:mod:`influence.demo.controls`), in table order."""


def control_label(task: dict, control: str) -> str:
    if control == "before_finetuning":
        init = task.get("controls", {}).get("init", "random")
        return "↳ before fine-tuning" + (" (random init)" if init == "random" else " (base model)")
    return "↳ swapped responses"


def results_table(results: dict, key: str = "acc") -> list[list[str]]:
    """Rows ``[task, n_train, chance, method...]`` of one metric (header first); under each
    task, its control rows (not for ``key="seconds"``)."""
    methods = _methods_run(results)
    rows = [["task", "n_train", {"auc": "chance(0.5)", "seconds": "task total"}.get(key, "chance"),
             *methods]]
    for t in results["tasks"]:
        base = {"auc": 0.5, "seconds": t["seconds"]}.get(key, t["chance"])
        rows.append([t["task"], str(t["n_train"]), _fmt(base),
                     *[_cell(t["methods"].get(m), key) for m in methods]])
        for control in CONTROLS if key != "seconds" else ():
            entry = t.get("controls", {}).get(control)
            if entry is not None:
                rows.append([control_label(t, control), "", _fmt(base),
                             *[_cell(entry["methods"].get(m), key) for m in methods]])
    return rows


def swapped_table(results: dict) -> list[list[str]]:
    """Per task and method, swapped-response Acc against the prompt's class / the response's."""
    methods = _methods_run(results)
    rows = [["task", *methods]]
    for t in results["tasks"]:
        entry = t.get("controls", {}).get("swapped_responses")
        if entry is None:
            continue
        cells = [f"{e['acc']:.2f} / {e['acc_response']:.2f}" if (e := entry["methods"].get(m))
                 and e.get("status") == "ok" else "" for m in methods]
        rows.append([t["task"], *cells])
    return rows if len(rows) > 1 else []


def ihvp_table(results: dict) -> list[list[str]]:
    names = sorted({m for t in results["tasks"] for m in t["ihvp_error"]},
                   key=lambda m: list(METHODS).index(m))
    rows = [["task", *[f"{m} rel.err / cos" for m in names]]]
    for t in results["tasks"]:
        errs = t["ihvp_error"]
        rows.append([t["task"], *[
            f"{errs[m]['relative_error']:.2f} / {errs[m]['cosine']:.2f}" if m in errs else ""
            for m in names]])
    return rows if names else []


def epochs_table(results: dict) -> list[list[str]]:
    rows = [["task", "epoch", "train loss", "query loss", "acc (identity / repsim)"]]
    for t in results["tasks"]:
        for h in t["epochs"]:
            if "methods" not in h:
                continue
            accs = " / ".join(_cell(h["methods"].get(m), "acc") for m in ("identity", "repsim"))
            rows.append([t["task"], str(h["epoch"]), f"{h['train_loss']:.3f}",
                         f"{h['query_loss']:.3f}", accs])
    return rows


def sweep_table(results: dict) -> list[list[str]]:
    """Acc / Cover of ``exact`` as damping grows (large damping → gradient match)."""
    ratios = sorted({r for t in results["tasks"] for r in t.get("exact_damping_sweep", {})}, key=float)
    if not ratios:
        return []
    rows = [["task", *[f"ratio {r}" for r in ratios]]]
    for t in results["tasks"]:
        sweep = t.get("exact_damping_sweep", {})
        rows.append([t["task"], *[f"{sweep[r]['acc']:.2f} / {sweep[r]['cover']:.2f}" if r in sweep
                                  else "" for r in ratios]])
    return rows


def not_run(results: dict) -> dict[str, str]:
    out = {}
    for t in results["tasks"]:
        for m, e in t["methods"].items():
            if e.get("status") != "ok":
                out.setdefault(m, f"{e['status']}: {e['reason']}")
    return out


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


INFLUENCE_METHODS = ("exact", "datainf", "lissa", "lissa_paper", "cg", "arnoldi", "kfac", "ekfac")


def _mean_metric(results: dict, method: str, key: str) -> float | None:
    values = [t["methods"][method][key] for t in results["tasks"]
              if t["methods"].get(method, {}).get("status") == "ok" and t["methods"][method].get(key) is not None]
    return sum(values) / len(values) if values else None


def conclusions(results: dict) -> list[str]:
    """A few sentences that read the tables: baseline vs influence functions, iHVP errors,
    chance levels, and how quality moved with fine-tuning (computed from ``results``)."""
    out = []
    n = len(results["tasks"])
    chance = sum(t["chance"] for t in results["tasks"]) / max(n, 1)
    acc = {m: _mean_metric(results, m, "acc") for m in _methods_run(results)}
    acc = {m: v for m, v in acc.items() if v is not None}
    if acc:
        best = max(acc, key=acc.get)
        out.append(f"Averaged over the {n} task(s), the best Acc is {best}'s {acc[best]:.2f} "
                   f"(chance {chance:.2f}).")
    influence = {m: v for m, v in acc.items() if m in INFLUENCE_METHODS}
    if influence and "repsim" in acc:
        top = max(influence, key=influence.get)
        if acc["repsim"] > influence[top]:
            verdict = ("as in the study, the representation-similarity baseline beats every "
                       "influence-function method here")
        else:
            verdict = ("unlike the study, an influence-function method matches or beats the "
                       "representation-similarity baseline here")
        out.append(f"RepSim averages Acc {acc['repsim']:.2f} against {influence[top]:.2f} for the "
                   f"best influence-function method ({top}): {verdict}.")
    if "identity" in acc and influence:
        top = max(influence, key=influence.get)
        out.append(f"Plain gradient similarity (identity) averages {acc['identity']:.2f}: the "
                   f"curvature {'adds' if influence[top] > acc['identity'] else 'adds nothing'} "
                   "over it at this scale.")
    out += control_conclusions(results)
    errors = {}
    for t in results["tasks"]:
        for m, e in t["ihvp_error"].items():
            errors.setdefault(m, []).append(e["relative_error"])
    if errors:
        ranked = sorted(errors, key=lambda m: sum(errors[m]) / len(errors[m]))
        parts = [f"{m} {sum(errors[m]) / len(errors[m]):.2f}" for m in ranked]
        out.append("Mean relative iHVP error against the exact inverse: " + ", ".join(parts)
                   + ". Large errors with good Acc (or the reverse) mean the ranking does not "
                   "hinge on solving the system exactly, the study's first finding.")
    moved = []
    for t in results["tasks"]:
        pts = [h["methods"]["identity"]["acc"] for h in t["epochs"]
               if h.get("methods", {}).get("identity", {}).get("status") == "ok"]
        if len(pts) > 1:
            moved.append(f"{t['task']} {pts[0]:.2f} → {pts[-1]:.2f}")
    if moved:
        out.append("Identity's Acc from the first checkpoint to the last epoch: " + "; ".join(moved)
                   + " (see the epochs table and plot: quality need not improve as fine-tuning "
                   "converges, the study's second finding).")
    return out


MARGIN = 0.1
"""How far a method's Acc must exceed its before-fine-tuning Acc to count as above that control."""


def _mean_control(results: dict, control: str, method: str, key: str) -> float | None:
    values = [e[key] for t in results["tasks"]
              if (e := t.get("controls", {}).get(control, {}).get("methods", {}).get(method))
              and e.get("status") == "ok"]
    return sum(values) / len(values) if values else None


def beats_controls(task: dict, method: str) -> bool | None:
    """Whether ``method`` beats both controls on ``task``: Acc more than :data:`MARGIN` above
    its before-fine-tuning Acc, and swapped-response Acc above chance (``None``: not run)."""
    controls = task.get("controls", {})
    entries = [task["methods"].get(method),
               controls.get("before_finetuning", {}).get("methods", {}).get(method),
               controls.get("swapped_responses", {}).get("methods", {}).get(method)]
    if any(e is None or e.get("status") != "ok" for e in entries):
        return None
    main, before, swapped = entries
    return main["acc"] > before["acc"] + MARGIN and swapped["acc"] > task["chance"]


def control_conclusions(results: dict) -> list[str]:
    """What the control rows say: per method, mean Acc fine-tuned / before / swapped, and per
    task the methods that beat both controls (:func:`beats_controls`)."""
    if not any("controls" in t for t in results["tasks"]):
        return []
    n = len(results["tasks"])
    chance = sum(t["chance"] for t in results["tasks"]) / max(n, 1)
    parts = []
    for m in _methods_run(results):
        acc = _mean_metric(results, m, "acc")
        before = _mean_control(results, "before_finetuning", m, "acc")
        swapped = _mean_control(results, "swapped_responses", m, "acc")
        follows = _mean_control(results, "swapped_responses", m, "acc_response")
        if acc is None or before is None or swapped is None:
            continue
        parts.append(f"{m} {acc:.2f} / {before:.2f} / {swapped:.2f}"
                     + (f" (follows the response {follows:.2f})" if follows is not None else ""))
    if not parts:
        return []
    init = next(t["controls"]["init"] for t in results["tasks"] if "controls" in t)
    model = "a randomly initialised model" if init == "random" else "the base model"
    per_task = [f"{t['task']}: " + (", ".join(m for m in _methods_run(results) if beats_controls(t, m))
                                    or "none") for t in results["tasks"] if "controls" in t]
    return [f"Controls, mean Acc fine-tuned / before fine-tuning ({model}, adapters at their "
            f"initialisation) / swapped responses (chance {chance:.2f}): " + "; ".join(parts) + ".",
            f"Methods that beat both controls (Acc more than {MARGIN:g} above the "
            "before-fine-tuning row and above chance on swapped responses), per task: "
            + "; ".join(per_task) + ". Elsewhere a high Acc says which training examples share "
            "the query's answer tokens, not what fine-tuning taught."]


def summary(results: dict) -> str:
    """The terminal summary: the three metric tables, iHVP errors, methods that failed."""
    parts = []
    for key, title in (("acc", "Acc (top-1 has the query's class)"),
                       ("cover", "Cover (same-class fraction of the top k, k = n_train // n_classes)"),
                       ("auc", "AUC (same-class vs rest)")):
        parts += [title, text_table(results_table(results, key)), ""]
    if swapped_table(results):
        parts += ["Swapped responses: Acc against the prompt's class / the response's class",
                  text_table(swapped_table(results)), ""]
    controls = control_conclusions(results)
    parts += [f"- {line}" for line in controls] + ([""] if controls else [])
    if ihvp_table(results):
        parts += ["iHVP error against exact (relative error / cosine)", text_table(ihvp_table(results)), ""]
    for m, why in not_run(results).items():
        parts.append(f"{m}: {why}")
    parts.append(f"total {results['seconds']:.0f} s")
    return "\n".join(parts)


def write_report(results: dict, out: str | Path) -> Path:
    """Writes ``results.json``, ``report.md`` and plots (if matplotlib) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    md = ["# influence demo: the study in miniature", "",
          f"Total time {results['seconds']:.0f} s. Base model: {results['pretrain']['num_params']:,} "
          "parameters. Ground truth: a training example explains a query when it has the "
          "query's class. Scores on the LoRA parameters; positive = helpful.", "",
          "## What the tables show", "",
          "**Acc**: the fraction of queries whose top-scored training example has the query's "
          "class; **Cover**: the same-class fraction of the top k, k = n_train // n_classes "
          "(the class size when classes are balanced; on harmful, with fewer forbidden examples "
          "than k, Cover cannot reach 1); **AUC**: how well scores separate same-class from other "
          "training examples (0.5 = chance). Each is compared with its chance level in the same "
          "row.", "",
          "Under each task, two **control rows** come from the same methods. *Before "
          "fine-tuning*: the same attribution on the model before fine-tuning (a randomly "
          "initialised model, or the base model, with the adapters at their initialisation): "
          "a model that has not learned the task. *Swapped responses*: each query keeps its "
          "prompt and class but gets the response of a training example of another class. "
          "What a method must beat: its fine-tuned Acc should be clearly above its "
          "before-fine-tuning row (otherwise it finds training examples that share the "
          "query's answer tokens, whatever the model learned) and should not collapse on the "
          "swapped row (a method that follows the answer tokens finds the other class there; "
          "the swapped table gives Acc against the prompt's class / the response's class).", ""]
    md += [f"- {line}" for line in conclusions(results)] + [""]
    if _can_plot():
        md += ["![Acc by task and method](acc_by_method.png)", "",
               "![Acc vs fine-tuning epochs](quality_vs_epochs.png)", ""]
    for key, title in (("acc", "Acc"), ("cover", "Cover (k = n_train // n_classes)"), ("auc", "AUC")):
        md += [f"## {title}", "", markdown_table(results_table(results, key)), ""]
    if swapped_table(results):
        md += ["## Swapped responses: Acc against the prompt's class / the response's class", "",
               markdown_table(swapped_table(results)), ""]
    md += ["## Seconds per method (fit + scoring, after fine-tuning)", "",
           markdown_table(results_table(results, "seconds")), ""]
    control_seconds = [(t["task"], t["controls"]["before_finetuning"]["seconds"],
                        t["controls"]["swapped_responses"]["seconds"])
                       for t in results["tasks"] if "before_finetuning" in t.get("controls", {})
                       and "swapped_responses" in t["controls"]]
    if control_seconds:
        md += ["Controls (included in the task totals), seconds before fine-tuning (every method "
               "refitted) / swapped responses (the fitted methods reused): "
               + "; ".join(f"{name} {a:.1f} / {b:.1f}" for name, a, b in control_seconds) + ".", ""]
    if ihvp_table(results):
        md += ["## iHVP error against exact", "", markdown_table(ihvp_table(results)), ""]
    if sweep_table(results):
        md += ["## Exact: Acc / Cover vs damping ratio", "",
               f"The main tables use ratio {results['config']['damping_ratio']:g} "
               "(λ = ratio · mean ‖∇ℓ‖² / P).", "", markdown_table(sweep_table(results)), ""]
    md += ["## Attribution quality vs fine-tuning epochs", "", markdown_table(epochs_table(results)), ""]
    missing = not_run(results)
    if missing:
        md += ["## Not run", ""] + [f"- `{m}`: {why}" for m, why in missing.items()] + [""]
    md += ["## Configuration", "", "```json", json.dumps(results["config"], indent=2, default=str), "```", ""]
    (out / "report.md").write_text("\n".join(md))
    _plots(results, out)
    return out


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plots(results: dict, out: Path) -> None:
    if not _can_plot():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (integer epoch ticks)

    methods = [m for m in _methods_run(results)
               if any(t["methods"].get(m, {}).get("status") == "ok" for t in results["tasks"])]
    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(2.6 + 1.3 * len(tasks), 3.8))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ys = [t["methods"].get(m, {}).get("acc", float("nan")) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], ys, width, label=m)
    ax.scatter([j + 0.4 - width / 2 for j in range(len(tasks))], [t["chance"] for t in tasks],
               marker="_", s=400, color="k", label="chance", zorder=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [t["task"] for t in tasks],
                  rotation=20)
    ax.set_ylabel("Acc (top-1)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acc: does the top training example have the query's class?", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "acc_by_method.png", dpi=120)
    plt.close(fig)

    cols = min(3, max(1, len(tasks)))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.8 + 2.6 * rows), squeeze=False, sharey=True)
    for ax, t in zip(axes.flat, tasks):  # one panel per task, a marker and style per method
        for m, style, marker in (("identity", "-", "o"), ("repsim", "--", "s")):
            pts = [(h["epoch"], h["methods"][m]["acc"]) for h in t["epochs"]
                   if h.get("methods", {}).get(m, {}).get("status") == "ok"]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, label=m)
        ax.axhline(t["chance"], color="k", lw=0.8, ls=":", label="chance")
        ax.set_title(t["task"], fontsize=9)
        ax.set_xlabel("fine-tuning epoch", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("Acc (top-1)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Attribution quality (Acc) vs fine-tuning epochs", fontsize=9, y=0.99)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=3,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.84))
    fig.savefig(out / "quality_vs_epochs.png", dpi=120)
    plt.close(fig)
