"""The attribution methods of the demo, in a registry keyed by name.

Each :class:`Method` either builds a :class:`~influence.curvature.Curvature` (influence
functions; scores are ``∇m(test)ᵀ (C + λI)⁻¹ ∇ℓ(train)`` on the LoRA parameters) or is a
representation-similarity baseline. A method is *available* when the library class it needs
exists in :mod:`influence` (other curvatures plug in as they land); otherwise the demo reports
it as unavailable with the reason.

=============== ===================================================================
``identity``    gradient match: ``C = I`` (the study's "Gradient Match")
``exact``       dense curvature of the LoRA parameters, Cholesky solve
``datainf``     DataInf (Kwon et al. 2024), the study's main method
``lissa``       LiSSA with the library's default (converged) settings
``lissa_paper`` LiSSA(variant="paper"): the study's 3 iterations and per-layer damping rule
``cg``          conjugate gradient on the same curvature as ``exact``
``arnoldi``     Arnoldi low-rank inverse
``kfac``        K-FAC;  ``ekfac``: EK-FAC (George et al. 2018; Grosse et al. 2023)
``repsim``      cosine of the last layer's hidden state at the last prompt token
=============== ===================================================================
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import influence



@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: registry key.
        classes: names in :mod:`influence` of the class to build (the first that exists).
        kwargs: extra constructor keywords (passed when the constructor accepts them).
        required: keyword groups of which the constructor must accept at least one per group
            (e.g. an iteration count for the study's 3-step LiSSA).
        kind: ``"curvature"`` or ``"repsim"``.
    """

    name: str
    classes: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)
    required: tuple[tuple[str, ...], ...] = ()
    kind: str = "curvature"
    description: str = ""

    def library_class(self):
        return next((getattr(influence, c) for c in self.classes if hasattr(influence, c)), None)

    def unavailable_reason(self) -> str | None:
        """``None`` when the method can run; otherwise why not."""
        if self.kind == "repsim":
            return None  # a local implementation backs it up
        cls = self.library_class()
        if cls is None:
            return f"influence has no {' / '.join(self.classes)} on this branch"
        accepted = _accepted(cls)
        for group in self.required:
            if accepted is not None and not accepted & set(group):
                return f"{cls.__name__} accepts none of {group}"
        return None

    def build(self, damping: float, curvature_type: str) -> Any:
        """The curvature instance, with the demo's damping and curvature type when accepted."""
        cls = self.library_class()
        wanted = {"damping": damping, "curvature_type": curvature_type, **self.kwargs}
        accepted = _accepted(cls)
        kwargs = wanted if accepted is None else {k: v for k, v in wanted.items() if k in accepted}
        return cls(**kwargs)


def _accepted(cls) -> set[str] | None:
    """Keyword names the constructor accepts (``None``: it takes ``**kwargs``)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


ITERATIONS = ("depth", "max_iter", "num_iterations", "iterations")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("identity", ("Identity",), description="gradient match"),
        Method("exact", ("Exact",), {"max_params": 20_000}, description="dense inverse"),
        Method("datainf", ("DataInf",), description="DataInf"),
        Method("lissa", ("LiSSA",), description="LiSSA, converged"),
        Method("lissa_paper", ("LiSSA",),
               {"variant": "paper", "damping": "datainf", **{k: 3 for k in ITERATIONS}}, (ITERATIONS,),
               description="LiSSA as in the study's code: 3 iterations, per-layer damping rule"),
        Method("cg", ("CG", "ConjugateGradient"), description="conjugate gradient"),
        Method("arnoldi", ("Arnoldi",), description="Arnoldi"),
        Method("kfac", ("KFAC",), description="K-FAC"),
        Method("ekfac", ("EKFAC",), description="EK-FAC"),
        Method("repsim", ("RepresentationSimilarity",), kind="repsim",
               description="RepSim (cosine, last prompt token)"),
    )
}
"""Every method the demo knows, by name (registration order = report order)."""


def check_methods(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}. Supported: {tuple(METHODS)}.")
    return list(names)


# ----------------------------------------------------------------------------- RepSim
def last_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """``(B, T, d)`` final-layer hidden states of a TinyLM or a HuggingFace / peft model."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    base = model
    while not hasattr(base, "hidden_states") and hasattr(base, "get_base_model"):
        base = base.get_base_model()  # peft wrappers
    if hasattr(base, "hidden_states") and callable(base.hidden_states):
        return base.hidden_states(**inputs)
    return model(**inputs, output_hidden_states=True).hidden_states[-1]


def repsim_scores(model, train_batches, test_batches) -> tuple[torch.Tensor, str]:
    """RepSim as in the study: cosine of final hidden states at the last prompt token."""
    repsim = influence.RepresentationSimilarity(layer=last_hidden, pooling="last_prompt", similarity="cosine")
    scores = repsim.fit(model, train_batches).pairwise_scores(test_batches)
    return torch.as_tensor(scores).double(), "influence.RepresentationSimilarity"
