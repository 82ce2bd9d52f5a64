"""``DataInf``: closed-form per-layer inverse of the damped Fisher (Kwon et al., ICLR 2024)."""

from __future__ import annotations

import torch

from ..distributed import all_gather_cat
from ..exceptions import CurvatureError
from ._base import check_conditioning
from ._layerwise import DATAINF, LayerDampingMixin, block_slices, datainf_damping, training_gradients
from ._operator import OperatorCurvature


class DataInf(LayerDampingMixin, OperatorCurvature):
    r"""Block-diagonal inverse with the order of averaging and inversion swapped.

    Kwon, Wu, Wu, Zou, "DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs and
    Diffusion Models", ICLR 2024. For each block ``l`` of the parameters (``blocks="module"``:
    ``layout.module_blocks()``; ``"parameter"``: one block per tensor, as in DataInf's code)
    with per-example training gradients ``g_j = g_{j,l}`` of the ``N`` fit examples,

    .. math::

        \Big(\tfrac1N \sum_j g_j g_jᵀ + λ_l I\Big)^{-1}
        \;\approx\; \tfrac1N \sum_j \big(g_j g_jᵀ + λ_l I\big)^{-1}
        \quad\Rightarrow\quad
        \mathrm{solve}(v)_l = \frac{1}{λ_l}\Big(v_l - \frac1N \sum_j
        \frac{g_jᵀ v_l}{λ_l + \lVert g_j \rVert^2}\, g_j\Big)

    by Sherman–Morrison on each rank-one term. ``damping="datainf"`` (default) is the study's
    rule ``λ_l = 0.1 · mean_{j,k} g_{j,l,k}²``; a float applies to every block. A block whose
    ``λ_l <= 1e-12 · (λ_l + max_j ‖g_j‖²)`` is numerically singular and raises
    :class:`~influence.CurvatureError` at solve time.

    ``fit`` stores all per-example training gradients (``N × P`` in the parameters' dtype, the
    memory cost of the method) and their block norms; ``solve`` on ``n`` queries is then two
    GEMMs per block (``(n, N)`` coefficients), batched over all queries. ``matmat`` applies the
    inverse of the approximation (Woodbury, an ``N × N`` Cholesky per block), so
    ``solve(matmat(V)) = V``; ``residual`` measures against the exact operator ``C + λI`` of
    ``curvature_type`` (default the empirical Fisher DataInf approximates, all blocks coupled).
    Under ``torch.distributed`` (no ``num_samples``) each rank computes the gradients of its
    shard and they are all-gathered in rank order, so every rank holds the same ``train_grads_``.

    Args:
        damping: float ``λ > 0`` or ``"datainf"``.
        blocks: ``"module"`` or ``"parameter"``.
        curvature_type: the reference curvature of ``residual`` (``"fisher"`` by default).
        num_samples: use this many seeded random training examples (``None``: all).
        seed: seed of that subsample.
        chunk_size: examples per vmap chunk of the per-example gradients.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> loader = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> cur = DataInf().fit(model, ClassificationTask(), loader)
        >>> V = torch.randn(2, 8, dtype=torch.float64)
        >>> torch.allclose(cur.solve(cur.matmat(V)), V)
        True
    """

    def __init__(
        self,
        damping: float | str = "datainf",
        blocks: str = "module",
        curvature_type: str = "fisher",
        num_samples: int | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
    ):
        super().__init__(damping=damping)
        self.blocks = blocks
        self.curvature_type = curvature_type
        self.num_samples = num_samples
        self.seed = seed
        self.chunk_size = chunk_size

    def _fit(self, model, task, loader, layout):
        self.slices_ = block_slices(layout, self.blocks, "DataInf")
        operator = self._make_operator(model, task, loader, layout)
        what = "train"
        if self.num_samples is not None:
            what = "train (numbered within the num_samples subsample)"
        elif operator.sharded:
            what = "train (numbered within this rank's shard)"
        grads = training_gradients(model, task, operator.loader, layout, self.chunk_size, what)
        # under torch.distributed each rank computes its shard's gradients; gathered in rank
        # order (contiguous shards), every rank holds all of them in loader order
        self.train_grads_ = all_gather_cat(grads) if operator.sharded else grads
        self.datainf_damping_ = datainf_damping(self.train_grads_, self.slices_)
        self.block_sq_norms_ = [
            self.train_grads_[:, sl].double().pow(2).sum(1) for sl in self.slices_
        ]

    def _block_damping(self, damping, sl: slice, sq_norms: torch.Tensor) -> float:
        """``λ_l`` of block ``sl``, checked against the block's rank-one systems.

        Each term ``g_j g_jᵀ + λ_l I`` that Sherman–Morrison inverts has eigenvalues ``λ_l`` and
        ``λ_l + ‖g_j‖²``; the block is refused when ``λ_l <= 1e-12 · (λ_l + max_j ‖g_j‖²)``
        (:func:`~influence.curvature._base.check_conditioning`, per block: blocks are solved
        independently, each with its own damping).
        """
        lam = self._coordinate_damping(damping)
        value = float(lam[sl.start]) if isinstance(lam, torch.Tensor) else float(lam)
        if value <= 0:
            why = " (with 'datainf', its training gradients are all zero)" if damping == DATAINF else ""
            raise CurvatureError(
                f"DataInf divides by the damping, but block [{sl.start}:{sl.stop}] has damping "
                f"{value:g}{why}. Use a float damping > 0."
            )
        largest = float(sq_norms.max()) if sq_norms.numel() else 0.0
        mean = float(sq_norms.mean()) / (sl.stop - sl.start) if sq_norms.numel() else None
        check_conditioning(0.0, largest, value, f"DataInf block [{sl.start}:{sl.stop}]", "fisher", mean)
        return value

    def _blocks(self, G, damping):
        train = self.train_grads_
        Q = G.to(train.device, torch.float64)
        for sl, sq in zip(self.slices_, self.block_sq_norms_):
            yield sl, Q[:, sl], train[:, sl].double(), sq, self._block_damping(damping, sl, sq)

    def _solve(self, G, damping):
        out = torch.empty(G.shape, dtype=torch.float64, device=self.train_grads_.device)
        N = self.train_grads_.shape[0]
        for sl, q, g, sq, lam in self._blocks(G, damping):
            coef = (q @ g.T) / (lam + sq)
            out[:, sl] = (q - coef @ g / N) / lam
        return out.to(G.device)

    def _matmat(self, V, damping):
        out = torch.empty(V.shape, dtype=torch.float64, device=self.train_grads_.device)
        N = self.train_grads_.shape[0]
        for sl, v, g, sq, lam in self._blocks(V, damping):
            K = torch.diag(N * (lam + sq)) - g @ g.T
            L = torch.linalg.cholesky(K)
            out[:, sl] = lam * (v + torch.cholesky_solve((v @ g.T).T, L).T @ g)
        return out.to(V.device)
