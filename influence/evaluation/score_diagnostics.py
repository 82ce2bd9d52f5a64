"""``diagnose_scores``: what a score matrix alone says about whether to trust it.

:func:`~influence.evaluation.diagnose` needs a fitted estimator. A score matrix from this
library, another one, or a paper's released files can still be checked for the failures Li et
al. 2024 ("Do Influence Functions Work on Large Language Models?") found:

1. **Dominance**: training examples that are the top-1 of many queries (the study's cached
   scores had one example top-1 for 234 of 260 queries). With labels, an example that is the
   top-1 of queries *of its own class* is a correct answer, not a hub: it is reported but not
   flagged when more than ``dominance_same_label`` of the queries it dominates share its label.
2. **Concentration** of the top-1 slots: the number of distinct top-1 examples next to its
   expectation under random rankings ``n_train · (1 − (1 − 1/n_train)^n_test)``, the
   effective number ``exp(H)`` of the top-1 distribution (``H`` its entropy in nats; it equals
   ``m`` when ``m`` examples share the top-1 slots equally) and the share of the top-1 slots
   held by the five most frequent examples. (A Gini coefficient of the counts is not reported:
   with fewer queries than training examples its floor is ``1 − n_test/n_train``, so its value
   says more about the matrix's shape than about concentration.)
3. **Correlations** of a training example's influence with its length or gradient norm (the
   study's hubs are among the shortest sequences): Spearman's ``ρ`` of the per-example mean
   score over queries, and of its top-1 count, with each given property.
4. **Class metrics** when labels are given, as :mod:`influence.evaluation` defines them: ``Acc``
   (:func:`~influence.evaluation.top1_accuracy`), ``Cover`` (:func:`~influence.evaluation.cover`,
   ``k = n_train // n_classes``) and ``AUC`` (:func:`~influence.evaluation.roc_auc` per query,
   same-class training examples as the planted set), with their chance levels.

Scores follow the library's convention: ``(n_test, n_train)``, larger = more helpful (load
files whose convention is the opposite with :func:`~influence.evaluation.load_scores`,
``sign=-1``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
from scipy.stats import rankdata, spearmanr

from ._stats import as_array, first_non_finite
from .class_metrics import cover, top1_accuracy
from .detection import roc_auc

SCORE_THRESHOLDS: dict[str, float] = {
    "dominance_share": 0.2,
    "dominance_min_count": 3,
    "dominance_same_label": 0.5,
    "feature_spearman": 0.5,
}
"""Flag thresholds of :func:`diagnose_scores`: an example is dominant when it is top-1 for at
least ``dominance_share`` of the queries and ``dominance_min_count`` queries; it is flagged
unless more than ``dominance_same_label`` of those queries have its label; a property is
flagged when ``|ρ(mean score, property)| >= feature_spearman``."""

TOP = 5  # examples listed in ``dominance["top"]`` and summed in ``top5_share``


@dataclass
class ScoreDiagnostics:
    """The result of :func:`diagnose_scores`; ``str(report)`` is markdown.

    Attributes:
        n_test, n_train: the matrix's shape.
        dominance: the most frequent top-1 training ``index``, its ``count`` and ``share`` of
            the queries, ``top`` (the five most frequent ``[index, count]``),
            ``distinct_top1`` and ``tied_top1`` (queries whose highest score is tied; their
            top-1 is the lowest tied index).
        dominant: one dict per training example reaching the dominance thresholds: ``index``,
            ``count``, ``share``, ``flagged``; with labels ``label`` and ``same_label_share``
            (the share of the queries it dominates that have its label); with lengths or
            gradient norms their value and ``*_quantile`` (0 = smallest, 1 = largest among the
            training examples, ties averaged).
        concentration: ``distinct_top1``, ``chance_distinct_top1`` (its expectation under
            random rankings), ``effective_top1`` (``exp`` of the top-1 distribution's entropy)
            and ``top5_share``.
        correlations: per given property (``"length"``, ``"grad_norm"``): Spearman ``ρ`` and
            p-value of the per-example mean score (``mean_score``, ``mean_score_p``) and of the
            top-1 count (``top1_count``, ``top1_count_p``); ``None`` when a side is constant.
        class_metrics: with labels: ``acc``, ``cover``, ``auc``, their chance levels
            (``chance_acc``, ``chance_cover``, ``chance_auc``), ``cover_k``, ``n_classes`` and
            ``auc_queries`` (queries whose class is neither absent from nor all of the training
            set; AUC is their mean). ``None`` without labels.
        flags: warnings, each naming the threshold it crossed.
        thresholds: the thresholds used.

    Examples:
        >>> import numpy as np
        >>> scores = np.array([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.1, 0.2, 0.7]])
        >>> report = diagnose_scores(scores, ["a", "b", "c"], ["a", "a", "c"])
        >>> report.n_test, report.n_train, report.dominance["index"], report.class_metrics["acc"]
        (3, 3, 0, 1.0)
        >>> report.to_dict()["flags"] == report.flags
        True
    """

    n_test: int
    n_train: int
    dominance: dict
    dominant: list[dict]
    concentration: dict
    correlations: dict
    class_metrics: dict | None
    flags: list[str] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (non-finite numbers become ``None``)."""
        from .report import _plain

        return _plain(asdict(self))

    def to_markdown(self) -> str:
        """The report as markdown: dominance, concentration, correlations, class metrics, flags."""
        d, c = self.dominance, self.concentration
        lines = [f"## Score diagnostics: {self.n_test} queries × {self.n_train} training examples", "",
                 "### Top-1 dominance", ""]
        lines += [f"- #{i} is top-1 for {n} of {self.n_test} queries ({n / self.n_test:.0%})" for i, n in d["top"]]
        if d["tied_top1"]:
            lines.append(f"- {d['tied_top1']} queries have a tied highest score (top-1 = lowest tied index)")
        lines += ["", "| concentration of the top-1 slots | value | random rankings |", "|---|---|---|",
                  f"| distinct top-1 examples | {c['distinct_top1']} | {c['chance_distinct_top1']:.1f} |",
                  f"| effective number exp(H) | {c['effective_top1']:.1f} | |",
                  f"| share of the {TOP} most frequent | {c['top5_share']:.0%} | |"]
        if self.dominant:
            lines += ["", "| dominant example | top-1 for | has its queries' label | length (quantile) "
                      "| gradient norm (quantile) | flagged |", "|---|---|---|---|---|---|"]
            lines += [_dominant_row(row, self.n_test) for row in self.dominant]
        if self.correlations:
            lines += ["", "### Spearman correlation with per-example properties", "",
                      "| property | mean score over queries | top-1 count |", "|---|---|---|"]
            for name, r in self.correlations.items():
                lines.append(f"| {name} | {_rho(r['mean_score'], r['mean_score_p'])} "
                             f"| {_rho(r['top1_count'], r['top1_count_p'])} |")
        m = self.class_metrics
        if m is not None:
            lines += ["", f"### Class metrics ({m['n_classes']} classes)", "", "| metric | value | chance |",
                      "|---|---|---|", f"| Acc | {m['acc']:.3f} | {m['chance_acc']:.3f} |",
                      f"| Cover (k = {m['cover_k']}) | {m['cover']:.3f} | {m['chance_cover']:.3f} |",
                      f"| AUC ({m['auc_queries']} queries) | {_num(m['auc'])} | {m['chance_auc']:.3f} |"]
        lines += ["", "### Flags" if self.flags else "### Flags: none"]
        lines += [f"- {flag}" for flag in self.flags]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def diagnose_scores(
    scores: Any,
    train_labels: Any = None,
    test_labels: Any = None,
    train_lengths: Any = None,
    train_grad_norms: Any = None,
    *,
    cover_k: int | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> ScoreDiagnostics:
    """Dominance, concentration, correlations and class metrics of a score matrix.

    Args:
        scores: ``(n_test, n_train)``, larger = more helpful (tensor or array-like).
        train_labels: class labels of the training examples (ints or strings; give both
            label arguments or neither).
        test_labels: class labels of the queries.
        train_lengths: ``(n_train,)`` lengths of the training examples (e.g. tokens).
        train_grad_norms: ``(n_train,)`` their gradient norms.
        cover_k: the ``k`` of ``Cover``; default ``n_train // n_classes``.
        thresholds: overrides of :data:`SCORE_THRESHOLDS`.

    Returns:
        :class:`ScoreDiagnostics`.

    Examples:
        >>> import numpy as np
        >>> scores = np.zeros((4, 3))
        >>> scores[:, 2] = 1.0  # training example #2 is everyone's top-1
        >>> report = diagnose_scores(scores, ["a", "b", "b"], ["a", "a", "a", "b"])
        >>> report.dominance["index"], report.dominance["count"]
        (2, 4)
        >>> print(report.flags[0].split("; ")[1].split(". ")[0])
        only 25% of them have its label ('b')
        >>> report.class_metrics["acc"]
        0.25
    """
    limits = {**SCORE_THRESHOLDS, **(thresholds or {})}
    unknown = set(limits) - set(SCORE_THRESHOLDS)
    if unknown:
        raise ValueError(f"Unknown thresholds {sorted(unknown)}. Known: {sorted(SCORE_THRESHOLDS)}.")
    S = _check_scores(scores)
    n_test, n_train = S.shape
    labels = _encode_labels(train_labels, test_labels, S.shape)
    features = {name: _feature(value, name, n_train)
                for name, value in (("length", train_lengths), ("grad_norm", train_grad_norms)) if value is not None}

    top1 = S.argmax(1)
    counts = np.bincount(top1, minlength=n_train)
    order = np.argsort(-counts, kind="stable")
    tied = int(((S == S.max(1, keepdims=True)).sum(1) > 1).sum())
    dominance = {
        "index": int(order[0]),
        "count": int(counts[order[0]]),
        "share": float(counts[order[0]] / n_test),
        "top": [[int(i), int(counts[i])] for i in order[:TOP] if counts[i] > 0],
        "distinct_top1": int((counts > 0).sum()),
        "tied_top1": tied,
    }
    p = counts[counts > 0] / n_test
    concentration = {
        "distinct_top1": dominance["distinct_top1"],
        "chance_distinct_top1": float(n_train * -math.expm1(n_test * math.log1p(-1 / n_train))) if n_train > 1 else 1.0,
        "effective_top1": float(np.exp(-(p * np.log(p)).sum())),
        "top5_share": float(counts[order[:TOP]].sum() / n_test),
    }
    dominant = [_dominant(int(i), counts, top1, labels, features, limits) for i in order
                if counts[i] >= limits["dominance_min_count"] and counts[i] / n_test >= limits["dominance_share"]]
    correlations = {name: _correlations(S.mean(0), counts, x) for name, x in features.items()}
    metrics = None if labels is None else _class_metrics(S, *labels[:2], cover_k)
    flags = _flags(dominant, correlations, tied, n_test, limits)
    return ScoreDiagnostics(n_test, n_train, dominance, dominant, concentration, correlations, metrics, flags, limits)


def _check_scores(scores: Any) -> np.ndarray:
    S = as_array(scores, "scores", (2,))
    if S.size == 0:
        raise ValueError(f"scores must have at least one query and one training example; got shape {S.shape}.")
    bad = first_non_finite(S)
    if bad is not None:
        count, i, j = bad
        raise ValueError(
            f"scores has {count} non-finite entries (NaN or inf), the first at [{i}, {j}] = "
            f"{S[i, j]}. Recompute them, or drop the affected queries/training examples."
        )
    return S


def _encode_labels(train_labels, test_labels, shape):
    """``(train_codes, test_codes, train_values)`` with labels mapped to ints, or ``None``."""
    if (train_labels is None) != (test_labels is None):
        raise ValueError("Pass both train_labels and test_labels (the class metrics need both), or neither.")
    if train_labels is None:
        return None
    tr = as_array(train_labels, "train_labels", (1,), dtype=object)
    te = as_array(test_labels, "test_labels", (1,), dtype=object)
    if (te.shape[0], tr.shape[0]) != shape:
        hint = " It looks transposed: pass scores.T." if shape == (tr.shape[0], te.shape[0]) else ""
        raise ValueError(
            f"scores must be (n_test, n_train) = {(te.shape[0], tr.shape[0])} from the labels; got {shape}.{hint}"
        )
    codes: dict = {}
    try:
        encoded = [np.array([codes.setdefault(v, len(codes)) for v in x], dtype=np.int64) for x in (tr, te)]
    except TypeError as error:
        raise ValueError(f"labels must be hashable (ints or strings): {error}.") from None
    return encoded[0], encoded[1], tr


def _feature(value: Any, name: str, n_train: int) -> np.ndarray:
    x = as_array(value, f"train_{name}s", (1,))
    if x.shape != (n_train,) or not np.isfinite(x).all():
        raise ValueError(
            f"train_{name}s must be {n_train} finite numbers (one per training example, the columns "
            f"of scores); got shape {x.shape}" + ("" if x.shape != (n_train,) else " with NaN/inf") + "."
        )
    return x


def _quantile(x: np.ndarray, i: int) -> float:
    return float((rankdata(x)[i] - 1) / max(len(x) - 1, 1))


def _dominant(i, counts, top1, labels, features, limits) -> dict:
    row = {"index": i, "count": int(counts[i]), "share": float(counts[i] / len(top1))}
    if labels is not None:
        train_codes, test_codes, train_values = labels
        row["label"] = train_values[i].item() if hasattr(train_values[i], "item") else train_values[i]
        row["same_label_share"] = float(np.mean(test_codes[top1 == i] == train_codes[i]))
    for name, x in features.items():
        row[name], row[f"{name}_quantile"] = float(x[i]), _quantile(x, i)
    row["flagged"] = labels is None or row["same_label_share"] <= limits["dominance_same_label"]
    return row


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    if np.ptp(a) == 0 or np.ptp(b) == 0 or len(a) < 3:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def _correlations(mean_score, counts, x) -> dict:
    rho, p = _spearman(mean_score, x)
    rho_count, p_count = _spearman(counts.astype(float), x)
    return {"mean_score": rho, "mean_score_p": p, "top1_count": rho_count, "top1_count_p": p_count}


def _class_metrics(S, tr, te, cover_k) -> dict:
    n_classes = len(np.unique(tr))
    k = max(1, len(tr) // n_classes) if cover_k is None else cover_k
    same = te[:, None] == tr[None, :]
    chance = float(same.mean(1).mean())
    defined = same.any(1) & ~same.all(1)  # AUC needs same- and other-class training examples
    return {
        "acc": top1_accuracy(S, tr, te),
        "cover": cover(S, tr, te, k),
        "auc": roc_auc(S[defined], same[defined]) if defined.any() else float("nan"),
        "chance_acc": chance,
        "chance_cover": chance,
        "chance_auc": 0.5,
        "cover_k": int(k),
        "n_classes": n_classes,
        "auc_queries": int(defined.sum()),
    }


def _flags(dominant, correlations, tied, n_test, limits) -> list[str]:
    flags = []
    for row in dominant:
        if not row["flagged"]:
            continue
        label = ("" if "same_label_share" not in row else
                 f"; only {row['same_label_share']:.0%} of them have its label ({row['label']!r})")
        flags.append(
            f"dominant example: training example #{row['index']} is top-1 for {row['count']} of {n_test} "
            f"queries ({row['share']:.0%} >= {limits['dominance_share']:.0%}){label}. Rankings may reflect "
            "its gradient norm rather than relevance; compare with gradient cosine or RepresentationSimilarity."
        )
    for name, r in correlations.items():
        if r["mean_score"] is not None and abs(r["mean_score"]) >= limits["feature_spearman"]:
            flags.append(
                f"influence follows {name}: Spearman ρ = {r['mean_score']:.2f} between a training "
                f"example's mean score over the queries and its {name} (|ρ| >= {limits['feature_spearman']:g}). "
                "The ranking may reflect that property rather than relevance."
            )
    if tied:
        flags.append(
            f"tied top-1: {tied} of {n_test} queries have several training examples with the highest "
            "score; their top-1 (and Acc, dominance) is the lowest tied index. Constant or zero score "
            "rows usually mean zero gradients."
        )
    return flags


def _dominant_row(row: dict, n_test: int) -> str:
    label = "" if "same_label_share" not in row else f"{row['same_label_share']:.0%} ({row['label']!r})"
    props = [f"{row[name]:.4g} ({row[name + '_quantile']:.2f})" if name in row else ""
             for name in ("length", "grad_norm")]
    return (f"| #{row['index']} | {row['count']} of {n_test} ({row['share']:.0%}) | {label} | {props[0]} | {props[1]} "
            f"| {'yes' if row['flagged'] else 'no'} |")


def _num(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _rho(rho, p) -> str:
    return "n/a (constant)" if rho is None else f"{rho:+.2f} (p = {p:.2g})"
