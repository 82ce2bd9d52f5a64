"""Other libraries' K-FAC/EK-FAC on the problems of ``compare_kronfluence.py`` (benchmark only).

Each adapter returns ``[(method, library, fisher, X, fit_s, solve_s)]`` with ``X`` the
preconditioned query gradients ``(C + λI)⁻¹ g_q`` (``(n_query, P)``, our flat parameter order),
or ``[]`` when the library is not installed (``pip install --target DIR --no-deps ...`` and
``PYTHONPATH``; never a dependency of influence):

- curvlinops (``curvlinops-for-pytorch``): ``KFACLinearOperator``/``EKFACLinearOperator`` with
  ``fisher_type="type-2"`` (the exact expectation over the classes, as our ``"expected"``),
  inverted by ``KFACInverseLinearOperator``. Two settings: its defaults (weight and bias in
  separate blocks, damping added to each factor: ``(A + λI) ⊗ (S + λI)``; EK-FAC only supports
  exact damping) and ours (one block with the bias as a homogeneous coordinate,
  ``(S ⊗ A + λI)⁻¹``).
- pyDVL: ``EkfacInfluence`` (Linear layers only), whose factors back-propagate
  ``Σ_c √p_c log p_c`` once per batch, i.e. the outer product of ``Σ_c √p_c (e_c − p)``: not the
  GGN's expectation (that sums the outer products of the ``C`` columns) but a rank-one surrogate.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def curvlinops_rows(model: nn.Module, loader, Gq: torch.Tensor, damping: float) -> list:
    try:
        from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
    except ImportError:
        return []
    params = list(model.parameters())
    loss = nn.CrossEntropyLoss(reduction="mean")
    rows = []
    for name, cls in (("KFAC", KFACLinearOperator), ("EKFAC", EKFACLinearOperator)):
        for setting, separate, exact in (("defaults", True, name == "EKFAC"), ("our blocks, exact damping", False, True)):
            def fit():
                op = cls(model, loss, params, loader, fisher_type="type-2", separate_weight_and_bias=separate,
                         check_deterministic=False)
                inverse = KFACInverseLinearOperator(op, damping=damping, use_exact_damping=exact)
                inverse @ Gq[:1].T  # the factors are computed on the first product
                return inverse

            inverse, fit_s = _timed(fit)
            X, solve_s = _timed(lambda: (inverse @ Gq.T).T)
            rows.append((f"{name} ({setting})", "curvlinops", "type-2", X, fit_s, solve_s))
    return rows


def pydvl_rows(model: nn.Module, loader, Gq: torch.Tensor, damping: float) -> list:
    if any(not isinstance(m, (nn.Linear, nn.Sequential, nn.Tanh, nn.ReLU)) for m in model.modules()):
        return []  # pyDVL's EK-FAC supports Linear layers only
    try:
        from pydvl.influence.torch import EkfacInfluence
    except ImportError:
        return []
    data = torch.utils.data.DataLoader(list(zip(*[torch.cat(t) for t in zip(*loader)])), batch_size=len(loader[0][0]))
    default = torch.get_default_dtype()
    torch.set_default_dtype(Gq.dtype)  # its factor buffers take the default dtype
    try:
        rows = []
        for name, update in (("KFAC", False), ("EKFAC", True)):
            inf, fit_s = _timed(lambda: EkfacInfluence(model, update_diagonal=update, hessian_regularization=damping,
                                                      progress=False).fit(data))
            model.zero_grad(set_to_none=True)
            X, solve_s = _timed(lambda: inf._solve_hvp(Gq))
            rows.append((name, "pyDVL", "Σ_c √p_c log p_c", X.detach(), fit_s, solve_s))
        return rows
    finally:
        torch.set_default_dtype(default)
