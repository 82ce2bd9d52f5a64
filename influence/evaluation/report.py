"""``DiagnosticReport``: the result of :func:`influence.evaluation.diagnose`, as a table and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class DiagnosticReport:
    """The result of :func:`diagnose`; ``str(report)`` is a readable table.

    Attributes:
        n_train, n_test, num_params: sizes.
        curvature: the fitted curvature's description.
        gradient_norm: ``‖(1/N) Σ_j ∇ℓ(z_j)‖`` at the fitted parameters.
        mean_example_gradient_norm: ``(1/N) Σ_j ‖∇ℓ(z_j)‖``.
        gradient_norm_ratio: their ratio (0 at a stationary point).
        ihvp: reference, parameters used, ``mean_relative_error``, ``mean_cosine`` (or
            ``skipped`` with the reason).
        agreement: per compared method: ``spearman`` (mean per query) and ``topk_overlap``.
        dominance: the most frequent top-1 training ``index``, its ``count`` and ``share`` of
            queries, ``top`` (the five most frequent ``[index, count]``),
            ``distinct_top1`` and ``tied_top1`` (see :class:`ScoreDiagnostics`).
        damping: per damping value: ``spearman`` and ``topk_overlap`` against the fitted one.
        flags: warnings, each naming the threshold it crossed.
        thresholds: the thresholds used.
        concentration: of the top-1 slots: ``distinct_top1``, ``chance_distinct_top1``,
            ``effective_top1``, ``top5_share`` (see :class:`ScoreDiagnostics`).

    Examples:
        >>> import json, torch, influence
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,)))]
        >>> est = influence.InfluenceEstimator(influence.Exact(damping=0.1)).fit(model, data)
        >>> report = influence.diagnose(est, data, k=3)
        >>> report.n_train, report.num_params, isinstance(report.flags, list)
        (12, 8, True)
        >>> json.loads(report.to_json())["n_test"]
        12
    """

    n_train: int
    n_test: int
    num_params: int
    curvature: str
    k: int
    gradient_norm: float
    mean_example_gradient_norm: float
    gradient_norm_ratio: float
    ihvp: dict
    agreement: list[dict]
    dominance: dict
    damping: list[dict]
    flags: list[str] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)
    concentration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return _plain(asdict(self))

    def to_json(self, path: str | None = None, indent: int = 2) -> str:
        """The report as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def __str__(self) -> str:
        lines = [
            f"Influence trust report: {self.n_test} queries x {self.n_train} training examples, "
            f"{self.num_params} parameters, {self.curvature}",
            "",
            "convergence",
            f"  {'|mean training gradient|':<33}{self.gradient_norm:.3e}",
            f"  {'mean |example gradient|':<33}{self.mean_example_gradient_norm:.3e}",
            f"  {'ratio':<33}{self.gradient_norm_ratio:.3e}",
            "",
            "iHVP error against reference",
        ]
        if "skipped" in self.ihvp:
            lines.append(f"  skipped: {self.ihvp['skipped']}")
        else:
            lines += [
                f"  reference                        {self.ihvp['reference']}",
                f"  parameters                       {self.ihvp['num_params']} ({self.ihvp['scope']})",
                f"  mean relative error              {self.ihvp['mean_relative_error']:.3g}",
                f"  mean cosine                      {self.ihvp['mean_cosine']:.3g}",
            ]
        lines += ["", f"rank agreement (Spearman, top-{self.k} overlap)"]
        for row in self.agreement:
            lines.append(f"  {row['method']:<32} {_fmt(row['spearman'])}   {_fmt(row['topk_overlap'])}")
        d = self.dominance
        lines += [
            "",
            "top-1 dominance",
            f"  most frequent top-1 example      #{d['index']}: {d['count']}/{self.n_test} "
            f"queries ({d['share']:.0%})",
            f"  distinct top-1 examples          {d['distinct_top1']}"
            + (f" (random rankings: {self.concentration['chance_distinct_top1']:.1f})" if self.concentration else ""),
        ]
        if self.concentration:
            lines += [
                f"  effective number exp(H)          {self.concentration['effective_top1']:.1f}",
                f"  share of the 5 most frequent     {self.concentration['top5_share']:.0%}",
            ]
        lines += [
            "",
            f"damping sensitivity (Spearman, top-{self.k} overlap vs fitted damping)",
        ]
        for row in self.damping:
            lines.append(f"  damping {row['damping']:<24.3g} {_fmt(row['spearman'])}   {_fmt(row['topk_overlap'])}")
        lines += ["", "flags" if self.flags else "flags: none"]
        lines += [f"  ! {flag}" for flag in self.flags]
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "  nan" if x is None or not np.isfinite(x) else f"{x:5.3f}"


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
