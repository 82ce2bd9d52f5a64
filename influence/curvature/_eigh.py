"""Robust eigendecomposition of a Kronecker factor (K-FAC's ``A`` and ``S``).

Kronecker factors are often very sparse in their coordinates: a 3×3 convolution over 1×1
feature maps (a ResNet-18's last stage at 32×32 inputs) sees only the centre tap of each
unfolded patch, so its ``A`` (``9·C + 1`` wide) is zero outside ``C + 1`` rows and columns, and
LAPACK's divide-and-conquer ``eigh`` was seen to fail to converge on such a factor
(issue 16). :func:`factor_eigh` therefore

1. eigendecomposes only the rows and columns that are not identically zero (their
   complement is an exact null space: eigenvalue 0 with unit eigenvectors on those
   coordinates) and embeds the result, which is exact and also much cheaper
   (``O(k³)`` instead of ``O(d³)``: 0.1 s instead of 53 s for the 4,609-wide factor above);
2. if ``torch.linalg.eigh`` still fails, retries with a trace-relative shift
   ``M + ε·(tr M / k)·I`` (same eigenvectors, eigenvalues shifted back), then with SciPy's
   MRRR (``driver="evr"``) and QR-iteration (``driver="ev"``) LAPACK drivers on the CPU;
3. raises :class:`~influence.exceptions.CurvatureError` naming the layer, the factor and its
   size when every attempt fails or the factor is not finite.

The eigenvalues are clamped at 0 (the factors are PSD; rounding can make the smallest
slightly negative) and returned with the eigenvectors as columns: ``M = Q diag(λ) Qᵀ``.
"""

from __future__ import annotations

import torch

from ..exceptions import CurvatureError

#: Relative size of the diagonal shift of the retry: ``ε · tr(M) / k``.
JITTER = 1e-10


def factor_eigh(M: torch.Tensor, layer: str, factor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ, Q)`` with ``M = Q diag(λ) Qᵀ``, ``λ >= 0``, for a symmetric PSD factor ``M``.

    ``layer`` and ``factor`` (``"A"`` or ``"S"``) name the factor in errors.

    Examples:
        >>> import torch
        >>> M = torch.zeros(4, 4, dtype=torch.float64)
        >>> M[1:3, 1:3] = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> values, vectors = factor_eigh(M, "conv", "A")
        >>> values.tolist()
        [0.0, 0.0, 1.0, 3.0]
        >>> torch.allclose(vectors @ torch.diag(values) @ vectors.T, M)
        True
    """
    d = M.shape[0]
    nonzero = M.ne(0)  # NaN counts as non-zero
    live = nonzero.any(dim=0) | nonzero.any(dim=1)
    kept, dead = live.nonzero().flatten(), (~live).nonzero().flatten()
    sub = M[kept][:, kept]
    if not bool(torch.isfinite(sub).all()):
        raise CurvatureError(
            f"The {factor} factor ({d}×{d}) of layer '{layer}' has NaN or inf entries: the "
            "statistics it was built from are not finite (check the training data and the "
            "model's loss, or the statistics passed to merge_statistics or loaded from a file)."
        )
    values = M.new_zeros(d)
    vectors = M.new_zeros(d, d)
    vectors[dead, torch.arange(dead.numel(), device=M.device)] = 1  # exact null space first
    if kept.numel():
        sub_values, sub_vectors = _eigh_with_fallbacks(0.5 * (sub + sub.T), layer, factor, d)
        columns = torch.arange(dead.numel(), d, device=M.device)
        values[columns] = sub_values
        vectors[kept[:, None], columns[None, :]] = sub_vectors
    return values.clamp_min(0), vectors


def _eigh_with_fallbacks(M: torch.Tensor, layer: str, factor: str, d: int):
    """``torch.linalg.eigh``, then a shifted retry, then SciPy's ``evr`` and ``ev`` drivers."""
    failures = []
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError as error:
        failures.append(f"torch.linalg.eigh: {_first_line(error)}")
    k = M.shape[0]
    shift = JITTER * max(float(M.diagonal().sum()) / k, torch.finfo(M.dtype).tiny)
    try:
        values, vectors = torch.linalg.eigh(M + shift * torch.eye(k, dtype=M.dtype, device=M.device))
        return values - shift, vectors
    except torch.linalg.LinAlgError as error:
        failures.append(f"torch.linalg.eigh with a {JITTER:g}·trace/k diagonal shift: {_first_line(error)}")
    import numpy as np
    import scipy.linalg

    for driver in ("evr", "ev"):
        try:
            values, vectors = scipy.linalg.eigh(M.detach().cpu().numpy(), driver=driver)
            return torch.from_numpy(values).to(M), torch.from_numpy(vectors).to(M)
        except (np.linalg.LinAlgError, ValueError) as error:
            failures.append(f"scipy.linalg.eigh(driver={driver!r}): {_first_line(error)}")
    raise CurvatureError(
        f"Could not eigendecompose the {factor} factor ({d}×{d}; {k} rows not identically zero) "
        f"of layer '{layer}': " + "; ".join(failures) + ". Please report the model and this "
        "error; meanwhile, leave this layer's parameters out of the attributed parameters "
        "(params=...), or use a curvature without Kronecker factors (Diagonal, CG, LiSSA)."
    )


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
