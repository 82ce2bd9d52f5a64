"""``LiSSA``: the stochastic Neumann-series inverse (Agarwal et al. 2017; Koh & Liang 2017)."""

from __future__ import annotations

import math
import warnings

import torch

from .._progress import solver_progress
from ..exceptions import ConvergenceWarning, CurvatureError
from ._layerwise import DATAINF, LayerDampingMixin, block_slices, datainf_damping, training_gradients
from ._operator import OperatorCurvature

VARIANTS = ("standard", "paper")
AVERAGING = ("auto", "tail", "none")
PAPER_ITERATIONS = 3
PAPER_DIVISOR = 1000.0  # the study's step (C − λI) x / 1000
_DIVERGENCE = 1e3  # a step longer than this many times ‖g‖ means the recursion diverges
_AUTO_RETRIES = 3  # scale='auto': on divergence retry with 4x the scale, this many times
DEFAULT_TOL = 0.05  # see the class docstring and docs/iterative_curvature.md


class LiSSA(LayerDampingMixin, OperatorCurvature):
    r"""Stochastic Neumann-series solve of ``(C + λI) x = g``, batched over the rows of ``G``.

    ``variant="standard"`` (Agarwal et al. 2017, "Second-Order Stochastic Optimization for
    Machine Learning in Linear Time"; as used by Koh & Liang 2017): with scale ``s``,

    .. math::

        x_0 = g, \qquad x_{t+1} = g + x_t - \frac{(C_{b_t} + λI)\, x_t}{s},
        \qquad \text{result } x_{\text{depth}} / s,

    where ``C_{b_t} = (1/n̄) Σ_{j∈b_t} C_j`` is the curvature summed over one training batch
    ``b_t``, drawn uniformly from the loader's batches (seeded by ``seed``), divided by the mean
    batch size ``n̄``: its mean over the draws is exactly ``C`` (with equal batches it is the
    batch's mean curvature; dividing a smaller last batch by its own size instead would weight
    its examples more, a bias of ~4·10⁻² in the setting below). The fixed point of the mean
    recursion is ``x = s (C + λI)⁻¹ g``; the recursion contracts when ``0 < (C + λI) < 2s`` and
    its error shrinks like
    ``(1 − (μ_min + λ)/s)^t``, so ``depth`` must be several times ``s / (μ_min + λ)``.
    ``num_repeats`` independent recursions (seeds ``seed``, ``seed + 1``, ...) are averaged.

    **Tail averaging** (``averaging``). With minibatch curvature the last iterate ``x_T`` does
    not converge: it keeps fluctuating around ``s (C + λI)⁻¹ g`` with a spread set by the
    minibatch noise, an error floor that depth does not lower (on a logistic regression with
    batches of 32, ``scale=5``, ``damping=0.01``: 9·10⁻² at depth 3000, see
    ``benchmarks/bench_lissa_noise.py``). The iterates' mean does converge, since the batch is
    drawn independently of ``x_t`` and so ``E[x_{t+1}] = g + (I − (C + λI)/s) E[x_t]`` has the
    exact fixed point (Polyak–Ruppert averaging; tail averaging as in Jain, Kakade, Kidambi,
    Netrapalli, Sidford, "Parallelizing Stochastic Gradient Descent for Least Squares
    Regression", JMLR 2018). ``averaging="tail"`` therefore returns the mean of the iterates
    of the last half, ``y_T = mean(x_{h+1}, ..., x_T) / s`` with ``h = ⌊T/2⌋`` (the first half
    is the burn-in, during which the start ``x_0 = g`` is forgotten). Its noise shrinks like
    ``1/√(T/2)``; its bias (the part of ``x_0`` not yet forgotten) decays like the burn-in's,
    ``(1 − (μ_min + λ)/s)^{T/2}``, so for the same bias it needs about twice the depth. With a
    single batch every step uses the same matrix, there is no noise to average, and the last
    iterate converges faster: the default ``averaging="auto"`` averages only when the loader
    (or ``num_samples`` subsample) has more than one batch; ``"none"`` always returns ``x_T/s``
    (the recursion of Agarwal et al. and Koh & Liang), ``"tail"`` always averages.

    ``scale="auto"`` estimates the top eigenvalue ``μ_max`` of ``C`` by power iteration at fit
    time (``power_iters`` passes) and uses ``s = 2 μ_max + λ`` at solve time (a margin for
    minibatch curvature above the mean); should a minibatch's curvature still exceed ``2s``
    and the recursion diverge, it warns (:class:`~influence.ConvergenceWarning`) and retries with
    ``4s``, up to three times. A numeric ``scale`` is used as given; when it is too
    small the iterate norm grows and :class:`~influence.CurvatureError` is raised suggesting a
    larger one.

    Convergence is checked after every solve: ``last_info_`` holds ``scale``, ``averaged``
    (whether the result is the tail average) and, per row of the reported iterate ``y``
    (``x`` itself, or its tail average; averaged over repeats), the final relative step
    ``final_step = ‖y_T − y_{T−1}‖ / ‖y_T‖`` and the relative change over the last half of the
    recursion ``half_change = ‖y_T − y_{⌊T/2⌋}‖ / ‖y_T‖``; with averaging, over the last half of
    the averaging window instead, ``‖y_T − y_{⌊3T/4⌋}‖ / ‖y_T‖`` (half the difference between
    the means of the window's two halves: it sees both a drift and the remaining noise, and a
    recursion still growing linearly gives 1/6 instead of 1/2). When either exceeds ``tol`` a
    :class:`~influence.ConvergenceWarning` says so (as CG does at ``max_iter``). The half-way
    change is needed because the final step alone misses a recursion that is far from its
    fixed point but moving slowly: with ``scale=1e6`` and ``depth=1000`` (relative error 1.0)
    each step is only ``1e-3`` of the iterate, while the half-way change is ``0.5``; the same
    linear growth is what a singular ``C`` at ``damping=0`` produces. The default ``tol=0.05``
    comes from a 3-class logistic regression (``benchmarks/bench_lissa_tol.py``): every solve
    with a relative error ``<= 1.5e-5`` passed (``half_change <= 0.004``), every solve with an
    error ``>= 0.1`` warned (``half_change >= 0.17``); errors of 0.6-5% fall on either side.

    ``variant="paper"`` reproduces the LiSSA of the code of Li et al. 2024 ("Do Influence
    Functions Work on Large Language Models?"): ``influence_function(..., hvp_cal='LiSSA')``
    with its defaults ``n_iteration=3``, ``alpha_const=1``, ``lambda_c=10``. Per parameter block
    ``l`` (``blocks``; the study's code uses one block per parameter tensor, ``"parameter"``,
    the default) and with the empirical Fisher ``C_l = (1/N) Σ_j g_{j,l} g_{j,l}ᵀ`` of all fit
    examples, it iterates, with ``d = paper_divisor`` (the study's 1000),

    .. math:: x_0 = g_l, \qquad x_{t+1} = g_l + x_t - \frac{(C_l - λ_l I)\, x_t}{d}

    three times (**minus** the damping, no final division; ``depth``, ``scale``,
    ``num_repeats`` are ignored) and returns ``x_3 = Σ_{k=0}^{3} (I − (C_l − λ_l I)/d)^k g_l``.
    This is not a convergent solver of ``(C + λI)⁻¹``: with ``d = 1000`` and a curvature small
    next to ``d``, ``x_3 ≈ 4 g_l − 6 (C_l − λ_l I) g_l / d``, about four times gradient match
    (Li et al. found "Hessian-based ≈ gradient match"). It exists so that the study's numbers
    can be reproduced. Its convergence is checked like the standard variant's (``x_3`` against
    ``x_2`` and ``x_1``), so it warns. With ``damping="datainf"``,
    ``λ_l = mean_j(mean(g_{j,l}²)) / 10`` as in the study; a float applies to every block.
    DataInf's ``IFEngine.compute_hvp_LiSSA`` (Kwon et al. 2024), from which the study's code
    derives, iterates the same loop with a step ``alpha_const`` and no division by 1000:
    ``paper_divisor = 1 / alpha_const`` gives it. ``paper_divisor=1`` (this variant before the
    divisor was added) is dominated by ``−(C_l − λ_l I)³ g_l`` once the curvature's eigenvalues
    exceed 1, as on the demo's LoRA gradients (relative iHVP error up to 5·10⁴). It holds all
    per-example training gradients (``N × P``).

    ``matmat`` and ``residual`` use the exact operator ``C + λI`` of ``curvature_type``.

    Under ``torch.distributed`` (no ``num_samples``) the power iteration of ``scale="auto"``,
    ``matmat`` and ``residual`` are data-parallel (shard products, all-reduced), while the
    recursion is replicated: every rank draws the same seeded batches from the full loader and
    reduces nothing, so all ranks return the same solve. ``variant="paper"`` computes its
    training gradients on the full loader on every rank.

    Args:
        damping: ``λ`` (``"datainf"`` only with ``variant="paper"``).
        curvature_type: ``"ggn"`` (default, positive semi-definite), ``"hessian"`` or
            ``"fisher"`` (standard variant; the recursion needs ``C + λI`` positive definite).
        depth: recursion steps.
        num_repeats: independent recursions averaged.
        scale: ``s > 0`` or ``"auto"``.
        variant: ``"standard"`` or ``"paper"``.
        averaging: ``"auto"`` (tail averaging when there is more than one batch), ``"tail"``
            or ``"none"`` (the last iterate); standard variant only.
        power_iters: power-iteration passes of ``scale="auto"``.
        blocks: ``"parameter"`` or ``"module"`` (paper variant).
        seed: seed of the minibatch draws (and of ``num_samples``).
        num_samples: restrict the operator to this many seeded random examples.
        chunk_size: rows per vmapped curvature product.
        tol: warn when a row's ``final_step`` or ``half_change`` exceeds it (``float('inf')``
            disables the check).
        paper_divisor: ``d > 0``, the divisor of the paper variant's step (the study's 1000);
            ignored by the standard variant.

    Examples:
        >>> import torch
        >>> from influence import ClassificationTask, Exact
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2).double()
        >>> loader = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> lissa = LiSSA(damping=0.1, depth=100).fit(model, ClassificationTask(), loader)
        >>> G = torch.randn(2, 8, dtype=torch.float64)
        >>> bool(lissa.residual(G).max() < 1e-3)
        True
    """

    # two minibatches of a rank-deficient problem: the minibatch-noise floor is ~0.1
    conformance_rtol = 0.2
    # depth 40 is deliberately short for speed; the convergence check has its own tests
    conformance_params = {"depth": 40, "tol": float("inf")}

    def __init__(
        self,
        damping: float | str = 1e-3,
        curvature_type: str = "ggn",
        depth: int = 1000,
        num_repeats: int = 1,
        scale: float | str = "auto",
        variant: str = "standard",
        power_iters: int = 20,
        blocks: str = "parameter",
        seed: int = 0,
        num_samples: int | None = None,
        chunk_size: int | None = None,
        tol: float = DEFAULT_TOL,
        averaging: str = "auto",
        paper_divisor: float = PAPER_DIVISOR,
    ):
        super().__init__(damping=damping)
        self.curvature_type = curvature_type
        self.depth = depth
        self.num_repeats = num_repeats
        self.scale = scale
        self.variant = variant
        self.power_iters = power_iters
        self.blocks = blocks
        self.seed = seed
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.tol = tol
        self.averaging = averaging
        self.paper_divisor = paper_divisor

    def _fit(self, model, task, loader, layout):
        if self.variant not in VARIANTS:
            raise ValueError(f"Invalid variant {self.variant!r}. Supported: {VARIANTS}.")
        if self.averaging not in AVERAGING:
            raise ValueError(f"Invalid averaging {self.averaging!r}. Supported: {AVERAGING}.")
        for name in ("depth", "num_repeats", "power_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LiSSA: {name} must be a positive integer; got {value!r}.")
        if self.scale != "auto" and (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, (int, float))
            or not (math.isfinite(self.scale) and self.scale > 0)
        ):
            raise ValueError(f"LiSSA: scale must be a float > 0 or 'auto'; got {self.scale!r}.")
        if isinstance(self.paper_divisor, bool) or not isinstance(self.paper_divisor, (int, float)) or not (
            math.isfinite(self.paper_divisor) and self.paper_divisor > 0
        ):
            raise ValueError(
                f"LiSSA: paper_divisor must be a finite float > 0 (the study's 1000); got {self.paper_divisor!r}."
            )
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not self.tol > 0:
            raise ValueError(f"LiSSA: tol must be a float > 0 (float('inf') disables the check); got {self.tol!r}.")
        if self.damping == DATAINF and self.variant != "paper":
            raise ValueError(
                "LiSSA: damping='datainf' (the study's layer-wise rule) is only defined for "
                "variant='paper'; use a float damping with the standard variant."
            )
        operator = self._make_operator(model, task, loader, layout)
        if self.variant == "paper":
            self.slices_ = block_slices(layout, self.blocks, "LiSSA")
            self.train_grads_ = training_gradients(model, task, loader, layout, self.chunk_size)
            self.datainf_damping_ = datainf_damping(self.train_grads_, self.slices_)
        elif self.scale == "auto":
            self.top_eigenvalue_ = abs(operator.top_eigenvalue(self.power_iters, self.seed))
            self._auto_factor = 1.0

    def scale_for(self, damping: float) -> float:
        """The scale ``s`` a standard solve at ``damping`` uses."""
        if self.scale == "auto":
            return (2.0 * self.top_eigenvalue_ + damping) * getattr(self, "_auto_factor", 1.0)
        return float(self.scale)

    def _solve(self, G, damping):
        if self.variant == "paper":
            return self._solve_paper(G, damping)
        if damping == DATAINF:
            raise ValueError("LiSSA: damping='datainf' needs variant='paper'.")
        operator = self.operator_
        B = G.to(operator.device, torch.float64)
        s = self.scale_for(damping)
        if s <= 0:
            raise CurvatureError(
                "LiSSA: scale='auto' found a zero curvature and damping is 0: nothing to "
                "invert. Use damping > 0."
            )
        for attempt in range(_AUTO_RETRIES + 1):
            try:
                result = self._recursion(B, s, damping)
                break
            except _Diverged as diverged:
                if self.scale != "auto" or attempt == _AUTO_RETRIES:
                    raise CurvatureError(
                        f"LiSSA diverged at step {diverged.step} (repeat {diverged.repeat}): the "
                        f"iterate norm grew to {diverged.norm:.3g} with scale={s:.3g}. The scale "
                        "must exceed half the largest eigenvalue of the (minibatch) curvature plus "
                        "damping: use a larger scale (or scale='auto'), and for an indefinite "
                        "Hessian more damping or curvature_type='ggn'."
                    ) from None
                warnings.warn(
                    f"LiSSA with scale='auto' diverged at scale={s:.3g} (a minibatch's curvature "
                    f"exceeds twice the mean's top eigenvalue); retrying with scale={4 * s:.3g}. "
                    "Larger scales converge more slowly: consider a larger depth.",
                    ConvergenceWarning,
                    stacklevel=3,
                )
                s *= 4
                self._auto_factor = getattr(self, "_auto_factor", 1.0) * 4  # later solves too
        x, final_step, half_change, averaged = result
        self._set_info(s, final_step, half_change, averaged, (
            f"Its error shrinks like (1 − (smallest eigenvalue + damping)/scale)^step with "
            f"scale={s:g}: raise depth (to several times scale / (smallest eigenvalue + damping)), "
            "lower the scale, or add damping; with damping=0 a singular curvature makes the "
            "iterate grow without bound"
        ))
        return x.to(G.device)

    def _recursion(self, B: torch.Tensor, s: float, damping: float):
        """The result ``y_T / s`` averaged over repeats, its relative final step and half-way
        change (``y`` the reported iterate: ``x`` itself, or its tail average, see
        :class:`_Tracker`) and whether ``y`` is the tail average.

        Raises ``_Diverged`` when a step is non-finite or longer than ``1e3·‖g‖``. With progress
        on, a bar counts the steps of all repeats and shows the largest relative step of the
        reported iterate, ``max_i ‖y_t − y_{t−1}‖ / ‖y_t‖`` (every ``depth // 100`` steps), and at
        the end the solve's ``final_step`` and ``half_change`` (their maxima over the rows).
        """
        operator = self.operator_
        batches = operator.batch_list()
        sizes = [operator.task.num_examples(batch) for batch in batches]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        # a batch's mean curvature weighted by its size over the mean size: unbiased for C
        weights = [n * len(sizes) / sum(sizes) for n in sizes]
        averaged = self.averaging == "tail" or (self.averaging == "auto" and len(batches) > 1)
        b_norm = B.norm(dim=1)
        total, previous, midway = torch.zeros_like(B), torch.zeros_like(B), torch.zeros_like(B)
        every = max(1, self.depth // 100)  # steps between updates of the shown step size
        with solver_progress(f"LiSSA ({B.shape[0]} rows)", self.depth * self.num_repeats, "step") as bar:
            for repeat in range(self.num_repeats):
                generator = torch.Generator().manual_seed(self.seed + repeat)
                x = B.clone()
                tracker = _Tracker(self.depth, averaged, x)
                for t in range(1, self.depth + 1):
                    i = int(torch.randint(len(batches), (1,), generator=generator))
                    step = B - (weights[i] * operator.batch_matmat(batches[i], x, offsets[i], index=i) + damping * x) / s
                    size = step.norm(dim=1)
                    if not bool(torch.isfinite(size).all()) or bool((size > _DIVERGENCE * b_norm).any()):
                        raise _Diverged(t - 1, repeat, float(x.norm(dim=1).max()))
                    x = x + step
                    before = tracker.value
                    tracker.update(t, x)
                    if bar is not None and (t % every == 0 or t == self.depth):
                        bar.update(step=_relative((tracker.value - before).norm(dim=1), tracker.value).max())
                    elif bar is not None:
                        bar.update()
                total += tracker.value / s
                previous += tracker.previous / s
                midway += tracker.midway / s
            x, R = total / self.num_repeats, self.num_repeats
            final_step = _relative((total - previous).norm(dim=1) / R, x)
            half_change = _relative((total - midway).norm(dim=1) / R, x)
            if bar is not None and len(x):
                bar.finish(step=final_step.max(), half_change=half_change.max())
        return x, final_step, half_change, averaged

    def _set_info(self, scale, final_step, half_change, averaged: bool, advice: str) -> None:
        """Sets ``last_info_`` and warns (:class:`~influence.ConvergenceWarning`) above ``tol``.

        ``final_step = ‖y_T − y_{T−1}‖ / ‖y_T‖`` and ``half_change = ‖y_T − y_mid‖ / ‖y_T‖``
        per row, for the reported iterate ``y`` (averaged over repeats): without averaging
        ``y = x`` and ``mid = ⌊T/2⌋``; with tail averaging ``y`` is the running mean over the
        window ``(⌊T/2⌋, T]`` and ``mid`` the window's middle (:class:`_Tracker`), so that
        ``half_change`` is half the difference between the means of the window's two halves.
        The final step alone misses a recursion still far from its fixed point: while its
        slowest component grows linearly (``t ≪ s / (μ_min + λ)``, or a singular ``C`` at
        ``damping=0``) each step is only ~``1/t`` of the iterate, whereas the change over the
        last half stays near ``1/2`` (near ``1/6`` for the tail average).
        """
        self.last_info_ = {
            "scale": scale, "final_step": final_step.cpu(), "half_change": half_change.cpu(), "averaged": averaged,
        }
        worst = float(torch.maximum(final_step, half_change).max()) if final_step.numel() else 0.0
        if worst > self.tol:
            rows = int((torch.maximum(final_step, half_change) > self.tol).sum())
            warnings.warn(
                f"LiSSA has not converged: in {rows} of {final_step.numel()} rows the solution "
                f"still moves by more than tol={self.tol:g} of its norm (worst: "
                f"{float(half_change.max()):.3g} "
                + (f"between the tail average at the middle and at the end of its window (the last "
                   f"{self._steps() - self._steps() // 2} of the {self._steps()} steps), "
                   if averaged else f"over the last half of the {self._steps()} steps, ")
                + f"{float(final_step.max()):.3g} in the final step). {advice}. Per-row "
                "details: last_info_.",
                ConvergenceWarning,
                stacklevel=4,
            )

    def _steps(self) -> int:
        return PAPER_ITERATIONS if self.variant == "paper" else self.depth

    def _solve_paper(self, G, damping):
        lam = self._coordinate_damping(damping)
        d = float(self.paper_divisor)
        train = self.train_grads_.double()
        N = train.shape[0]
        Q = G.to(train.device, torch.float64)
        out = torch.empty_like(Q)
        step_sq = torch.zeros(Q.shape[0], dtype=torch.float64, device=Q.device)
        half_sq = torch.zeros_like(step_sq)
        for sl in self.slices_:
            g, q = train[:, sl], Q[:, sl]
            lam_l = lam[sl] if isinstance(lam, torch.Tensor) else lam
            x = midway = q
            for t in range(PAPER_ITERATIONS):
                previous, x = x, q + x - ((x @ g.T) @ g / N - lam_l * x) / d
                if t + 1 == PAPER_ITERATIONS // 2:
                    midway = x
            out[:, sl] = x
            step_sq += (x - previous).pow(2).sum(1)
            half_sq += (x - midway).pow(2).sum(1)
        self._set_info(d, _relative(step_sq.sqrt(), out), _relative(half_sq.sqrt(), out), False,
                       "variant='paper' runs the study's fixed 3 iterations and is not a "
                       f"convergent solver (with paper_divisor={d:g} its result is the partial "
                       f"Neumann sum Σ_(k<=3) (I − (C − λI)/{d:g})^k g, about 4 g when the curvature "
                       f"is small next to {d:g}); use variant='standard' for a converged solve")
        return out.to(G.device)


def _relative(norms: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``norms / ‖X‖`` per row, 0 for zero rows."""
    return norms / X.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)


class _Tracker:
    """The reported iterate ``y_t`` of one recursion, with ``y_{T−1}`` and ``y_mid`` kept.

    Without averaging ``y_t = x_t`` and ``mid = ⌊T/2⌋``. With tail averaging (window start
    ``h = ⌊T/2⌋``) ``y_t = x_t`` for ``t <= h`` and ``y_t = mean(x_{h+1}, ..., x_t)`` after, a
    running mean; ``mid = h + ⌊(T − h)/2⌋``, the middle of the window.
    """

    def __init__(self, depth: int, averaged: bool, x0: torch.Tensor):
        self.depth = depth
        self.start = depth // 2 if averaged else depth
        self.mid = self.start + (depth - self.start) // 2 if averaged else depth // 2
        self.value = self.previous = self.midway = x0

    def update(self, t: int, x: torch.Tensor) -> None:
        """Takes ``x_t`` (``t = 1, ..., depth``; never modified in place afterwards)."""
        if t == self.depth:
            self.previous = self.value
        self.value = x if t <= self.start else self.value + (x - self.value) / (t - self.start)
        if t == self.mid:
            self.midway = self.value


class _Diverged(Exception):
    """Raised inside a LiSSA recursion whose iterate norm grows."""

    def __init__(self, step: int, repeat: int, norm: float):
        super().__init__(step, repeat, norm)
        self.step, self.repeat, self.norm = step, repeat, norm
