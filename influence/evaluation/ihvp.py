"""``ihvp_error``: how far an approximate inverse-Hessian-vector product is from a reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..curvature._base import Curvature


@dataclass
class IHVPError:
    """Errors of ``x = curvature.solve(G)`` against ``x* = reference.solve(G)``, per row.

    Attributes:
        relative_error: ``‖x − x*‖ / ‖x*‖`` per row; mean in ``mean_relative_error``.
        cosine: ``cos(x, x*)`` per row; mean in ``mean_cosine``.
    """

    mean_relative_error: float
    mean_cosine: float
    relative_error: torch.Tensor = field(repr=False)
    cosine: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["relative_error"] = self.relative_error.tolist()
        d["cosine"] = self.cosine.tolist()
        return d


def ihvp_error(
    curvature: Curvature,
    reference: Curvature | torch.Tensor,
    G: torch.Tensor,
    damping: float | None = None,
) -> IHVPError:
    """Relative error and cosine of a curvature's iHVPs against a reference.

    Args:
        curvature: the fitted approximation.
        reference: a fitted reference curvature (``Exact``, or CG to a tight tolerance) on the
            same parameters, or its solutions ``(n, P)`` already computed.
        G: ``(n, P)`` vectors to solve, e.g. query gradients.
        damping: damping for both solves (default: each curvature's own).

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask, Exact, Identity
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> exact = Exact(damping=0.1).fit(model, ClassificationTask(), data)
        >>> G = torch.randn(4, 8, dtype=torch.float64)
        >>> ihvp_error(exact, exact, G).mean_relative_error
        0.0
    """
    X = curvature.solve(G, damping).double()
    if isinstance(reference, torch.Tensor):
        if reference.shape != X.shape:
            raise ValueError(
                f"reference solutions must have the shape of G, {tuple(X.shape)}; got "
                f"{tuple(reference.shape)}."
            )
        R = reference.double()
    else:
        if curvature.num_params_ != reference.num_params_:
            raise ValueError(
                f"curvature ({curvature.num_params_} parameters) and reference "
                f"({reference.num_params_}) were fitted on different parameter sets: fit both "
                "with the same params."
            )
        R = reference.solve(G, damping).double()
    ref_norm = R.norm(dim=1)
    rel = (X - R).norm(dim=1) / ref_norm.clamp_min(1e-300)
    cos = (X * R).sum(1) / (X.norm(dim=1) * ref_norm).clamp_min(1e-300)
    return IHVPError(float(rel.mean()), float(cos.mean()), rel, cos)
