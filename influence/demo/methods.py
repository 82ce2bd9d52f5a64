"""The attribution methods of the demo, in a registry keyed by name.

Each :class:`Method` either builds a :class:`~influence.curvature.Curvature` (influence
functions; scores are ``∇m(test)ᵀ (C + λI)⁻¹ ∇ℓ(train)`` on the LoRA parameters) or is the
representation-similarity baseline. Every curvature gets the demo's damping and, where it has
one, the demo's ``curvature_type`` (K-FAC/EK-FAC use their own Fisher).

=============== ===================================================================
``identity``    gradient match: ``C = I`` (the study's "Gradient Match")
``exact``       dense curvature of the LoRA parameters, Cholesky solve
``datainf``     DataInf (Kwon et al. 2024), the study's main method
``lissa``       LiSSA, 200 minibatch steps with the automatic (safe) scale
``lissa_paper`` LiSSA(variant="paper"): the study's 3 iterations and per-layer damping rule
``cg``          conjugate gradient on the same curvature as ``exact``
``arnoldi``     Arnoldi low-rank inverse
``kfac``        K-FAC;  ``ekfac``: EK-FAC (George et al. 2018; Grosse et al. 2023)
``repsim``      cosine of the last layer's hidden state at the last prompt token
=============== ===================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import influence
from influence.curvature._base import Curvature


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: registry key.
        make: ``(damping, curvature_type) -> Curvature``; ``None`` for RepSim.
        description: one line for the report.
    """

    name: str
    make: Callable[[float, str], Curvature] | None
    description: str = ""

    @property
    def kind(self) -> str:
        return "repsim" if self.make is None else "curvature"

    def build(self, damping: float, curvature_type: str) -> Curvature:
        """The curvature instance with the demo's damping and curvature type."""
        if self.make is None:
            raise ValueError(f"{self.name!r} is not a curvature method.")
        return self.make(damping, curvature_type)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("identity", lambda d, ct: influence.Identity(damping=d), "gradient match"),
        Method("exact", lambda d, ct: influence.Exact(d, ct, max_params=20_000), "dense inverse"),
        Method("datainf", lambda d, ct: influence.DataInf(d, curvature_type=ct), "DataInf"),
        Method("lissa", lambda d, ct: influence.LiSSA(d, ct, depth=200, scale="auto"),
               "LiSSA, 200 steps, safe automatic scale"),
        Method("lissa_paper", lambda d, ct: influence.LiSSA("datainf", ct, depth=3, variant="paper"),
               "LiSSA as in the study's code: 3 iterations, per-layer damping rule"),
        Method("cg", lambda d, ct: influence.CG(d, ct), "conjugate gradient"),
        Method("arnoldi", lambda d, ct: influence.Arnoldi(d, curvature_type=ct), "Arnoldi"),
        Method("kfac", lambda d, ct: influence.KFAC(d), "K-FAC"),
        Method("ekfac", lambda d, ct: influence.EKFAC(d), "EK-FAC"),
        Method("repsim", None, "RepSim (cosine, last prompt token)"),
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


def make_repsim() -> "influence.RepresentationSimilarity":
    """RepSim as in the study (unfitted): cosine of final hidden states at the last prompt token."""
    return influence.RepresentationSimilarity(layer=last_hidden, pooling="last_prompt", similarity="cosine")


def repsim_scores(model, train_batches, test_batches) -> tuple[torch.Tensor, str]:
    """RepSim scores ``(n_test, n_train)`` (float64) of one model, and the implementation's name."""
    scores = make_repsim().fit(model, train_batches).pairwise_scores(test_batches)
    return torch.as_tensor(scores).double(), "influence.RepresentationSimilarity"
