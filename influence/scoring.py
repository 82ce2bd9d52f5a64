"""Single-pass scoring: resident queries, each training batch's gradients computed once.

``score[i, j] = q_iᵀ ∇ℓ(z_j)`` with ``q_i = (C + λI)⁻¹ ∇m(z_test_i)``. Queries are prepared
once, per hook layer in one of these forms (chosen per layer from the cost model in
docs/DESIGN "Cost model", overridable with ``ScoringConfig.strategy``, reported in ``plan``):

- ``"materialise"``: ``q_i`` dense; the training gradient ``G_jᵀA_j`` is formed into a reused
  buffer and scored by one GEMM against all queries;
- ``"factored"``: ``q_i = Σ_k L_ik R_ikᵀ``. With the Identity curvature these are the query's
  own ``(g, a)`` (rank ``T``): **ghost inner products**, exact. Otherwise a rank-``r`` SVD
  (``query_rank``, kronfluence-style query batching; exact at full rank). A training example
  is scored as ``Σ_t Σ_k (g_tᵀL_ik)(R_ikᵀa_t)`` without forming its gradient;
- ``"projected"`` (``projection="factored"``, LoGra, Choe et al. 2024): seeded Gaussian
  ``P_in (k, d_in)``, ``P_out (k, d_out)``; ``a`` and ``g`` are projected separately and scores
  are ``⟨P_out q P_inᵀ, Σ_t (P_out g_t)(P_in a_t)ᵀ⟩`` (unbiased, JL);
- ``projection="dense"`` (TRAK, Park et al. 2023): the flat gradient times a seeded Gaussian
  ``(P, k)`` matrix, for every parameter.

LayerNorm and the torch.func parameters are always scored dense (they are small).
"""

from __future__ import annotations

import math
import warnings
from fnmatch import fnmatchcase
from typing import Any, Iterable, Iterator

import torch

from ._loader import iterate_batches
from ._progress import timed, track
from ._params_base import ParamsMixin
from .curvature._base import Curvature
from .curvature.identity import Identity
from ._projections import _gaussian, truncated_svd
from ._query_groups import _check_finite_block, _check_finite_scores, _first, _Group, _n
from .gradients.hooks import BatchGrads, GradientComputer, LayerFactors, weight_grads
from ._guards import report_unmeasured, unmeasured_examples

MODES = ("auto", "materialise", "factored")
PROJECTIONS = (None, "factored", "dense")
PRECISIONS = ("default", "bf16")
_REST = "<torch.func parameters>"
_CHUNK = 1 << 24  # elements of the largest temporary of the factored kernel
# Ghost/factored multiply-adds are small GEMMs on cached data; materialising writes and re-reads
# B·d_in·d_out gradient entries. Measured on 2 CPU cores (benchmarks/bench_crossover.py, torch
# 2.13, widths 128-1024, 16-64 queries) ghost's multiply-adds were ~1.5x cheaper near the
# crossover (measured ties at cost ratios 0.5-0.65): the factored form is chosen while
# cost_factored < GHOST_EFFICIENCY · cost_materialise.
GHOST_EFFICIENCY = 1.5


class ScoringConfig(ParamsMixin):
    """How queries are held and training examples scored.

    Args:
        strategy: ``"auto"`` (cost model), ``"materialise"``, ``"factored"``, or a dict
            ``{layer-name glob: mode}`` (unmatched layers: auto).
        query_rank: rank ``r`` of the per-layer SVD of preconditioned queries (non-Identity
            curvatures); ``None`` keeps them exact (factored then uses the full rank).
        projection: ``None``, ``"factored"`` (LoGra) or ``"dense"`` (TRAK).
        projection_dim: ``k`` per side (factored; sides with ``d <= k`` are kept exact) or in
            total (dense).
        seed: seed of the projections (same seed, same scores).
        precision: ``"default"`` (products in the gradients' dtype) or ``"bf16"`` (products in
            bfloat16, scores accumulated in float32 or higher).
        max_memory: bytes the resident queries may take; queries are split into the fewest
            groups that fit (one pass over the training set per group), with a warning.

    Examples:
        A LoGra-style factored projection to ``k = 2`` per side changes the scores (they
        approximate the exact ones); the default keeps them exact:

        >>> import torch, influence
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
        >>> data = [(torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,)))]
        >>> exact = influence.InfluenceEstimator(influence.Identity()).fit(model, data).pairwise_scores(data)
        >>> config = influence.ScoringConfig(projection="factored", projection_dim=2)
        >>> est = influence.InfluenceEstimator(influence.Identity(), scoring=config).fit(model, data)
        >>> projected = est.pairwise_scores(data)
        >>> projected.shape, torch.allclose(projected, exact)
        (torch.Size([10, 10]), False)
    """

    def __init__(self, strategy="auto", query_rank=None, projection=None, projection_dim=64, seed=0, precision="default", max_memory=None):
        self.strategy = strategy
        self.query_rank = query_rank
        self.projection = projection
        self.projection_dim = projection_dim
        self.seed = seed
        self.precision = precision
        self.max_memory = max_memory

    def validate(self) -> None:
        modes = self.strategy.values() if isinstance(self.strategy, dict) else [self.strategy]
        for m in modes:
            if m not in MODES:
                raise ValueError(f"Invalid strategy {m!r}. Supported: {MODES} (or a dict of them per layer).")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"Invalid projection {self.projection!r}. Supported: {PROJECTIONS}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Invalid precision {self.precision!r}. Supported: {PRECISIONS}.")
        for name in ("query_rank", "projection_dim", "max_memory"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None; got {v!r}.")


class Scorer:
    """Prepares resident queries and scores training batches against them in one pass.

    Args:
        computer: per-example gradients (hook path + torch.func).
        curvature: a fitted curvature; ``Identity`` enables exact ghost scoring.
        config: a :class:`ScoringConfig` (``None``: defaults).
        score_dtype: accumulation dtype (float32 or float64).
        aggregate: ``None``, ``"mean"`` or ``"sum"``: score one query, the mean (sum) of the
            preconditioned query gradients, held dense (:mod:`influence._aggregate`).
    """

    def __init__(self, computer: GradientComputer, curvature: Curvature, config: ScoringConfig | None = None,
                 score_dtype=torch.float32, aggregate: str | None = None):
        self.computer = computer
        self.aggregate = aggregate
        self.curvature = curvature
        self.config = ScoringConfig() if config is None else config
        self.config.validate()
        self.score_dtype = score_dtype
        self.identity = type(curvature) is Identity
        self.lam = curvature._damping(None) if self.identity else None
        if self.identity and self.lam == 0:
            curvature.solve(torch.zeros(1, curvature.layout_.num_params))  # raises its message
        self.plan: dict[str, Any] = {}
        self._proj: dict[Any, torch.Tensor] = {}
        self._bufs: dict[Any, torch.Tensor] = {}

    # ------------------------------------------------------------------------ the plan
    def _mode_for(self, name: str) -> str:
        s = self.config.strategy
        if isinstance(s, dict):
            return next((m for pat, m in s.items() if fnmatchcase(name, pat)), "auto")
        return s

    def _decide(self, bg: BatchGrads, n_queries: int) -> None:
        cfg = self.config
        layers = {}
        for name, f in bg.layers.items():
            info, T = f.info, max(f.g.shape[1], 1)
            d_in, d_out = info.d_in, info.d_out
            r = T if self.identity else (min(cfg.query_rank or d_in, d_in, d_out))
            emb = info.kind == "embedding"
            cost_mat = (T * d_out if emb else T * d_in * d_out) + n_queries * d_in * d_out
            cost_fac = n_queries * T * r * ((1 if emb else d_in) + d_out)
            entry = {"kind": info.kind, "d_in": d_in, "d_out": d_out, "tokens": T, "rank": r,
                     "cost_materialise": cost_mat, "cost_factored": cost_fac}
            wanted = self._mode_for(name)
            if info.kind == "layernorm":
                mode, why = "materialise", "LayerNorm: elementwise, always dense"
            elif cfg.projection == "dense":
                mode, why = "dense_projection", "projection='dense' (TRAK) on the flat gradient"
            elif cfg.projection == "factored":
                mode, why = "projected", "projection='factored' (LoGra)"
            elif self.aggregate is not None:  # a sum of factored queries grows in rank
                mode, why = "materialise", "aggregated query: one dense query (a sum of factored queries grows in rank)"
            elif wanted != "auto":
                mode, why = wanted, "set by strategy"
            elif not self.identity and cfg.query_rank is None:
                mode, why = "materialise", "exact preconditioned queries (set query_rank for low-rank)"
            else:
                mode = "factored" if cost_fac < GHOST_EFFICIENCY * cost_mat else "materialise"
                why = f"cost model (multiply-adds per training example; factored counted at 1/{GHOST_EFFICIENCY:g})"
            entry.update(mode=mode, reason=why)
            if mode == "factored":
                entry["form"] = "ghost (exact)" if self.identity else f"low-rank SVD r={r}"
            layers[name] = entry
        rest = self.computer.rest_layout
        self.plan.update({"layers": layers, "rest_params": rest.num_params if rest else 0,
                     "projection": cfg.projection, "precision": cfg.precision,
                     "num_queries": n_queries, "query_groups": 1})

    # ------------------------------------------------------------------------ queries
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16) if self.config.precision == "bf16" and t.is_floating_point() else t

    def _proj_mats(self, name: str, f: LayerFactors, idx: int):
        key = (name, f.g.device, f.g.dtype)
        if key not in self._proj:
            k = self.config.projection_dim
            info = f.info
            p_in = None if info.d_in <= k else _gaussian(self.config.seed, 2 * idx, (k, info.d_in), k, f.g)
            p_out = None if info.d_out <= k else _gaussian(self.config.seed, 2 * idx + 1, (k, info.d_out), k, f.g)
            self._proj[key] = (p_in, p_out)
        return self._proj[key]

    def _dense_proj(self, pname: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        key = (pname, like.device, like.dtype)
        if key not in self._proj:
            idx = self.computer.layout.names.index(pname)
            self._proj[key] = _gaussian(self.config.seed, idx, (numel, self.config.projection_dim), self.config.projection_dim, like)
        return self._proj[key]

    def _project_flat(self, G: torch.Tensor) -> torch.Tensor:
        out = 0
        for pname, sl in self.computer.slices.items():
            out = out + G[:, sl] @ self._dense_proj(pname, sl.stop - sl.start, G)
        return out

    def _layer_weights(self, name, f: LayerFactors, pre) -> torch.Tensor:
        if pre is None:
            return weight_grads(f).div_(self.lam)  # a fresh tensor: scaled in place
        n = f.g.shape[0]
        return pre[:, self.computer.slices[f.info.weight]].reshape(n, *self.computer.wshape[name])

    def _project_train(self, name, f: LayerFactors, idx) -> torch.Tensor:
        """``Σ_t (P_out g_t)(P_in a_t)ᵀ``, ``(B, k_out · k_in)``."""
        g, a = self.projected_factors(name, f, idx)
        return torch.bmm(g.transpose(1, 2), a).reshape(g.shape[0], -1)

    def projected_factors(self, name, f: LayerFactors, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_out g_t, P_in a_t)`` per token, ``(B, T, k_out)`` and ``(B, T, k_in)``."""
        p_in, p_out = self._proj_mats(name, f, idx)
        a, g = f.a, f.g
        if f.info.kind == "embedding":
            V = f.info.module.num_embeddings
            table = p_in.T if p_in is not None else torch.eye(V, dtype=g.dtype, device=g.device)
            a = table[a]
            if f.info.module.padding_idx is not None:
                a = a * (f.a != f.info.module.padding_idx)[..., None]
        elif p_in is not None:
            a = a @ p_in.T
        if p_out is not None:
            g = g @ p_out.T
        return g, a

    def _project_query(self, name, f, W, idx) -> torch.Tensor:
        p_in, p_out = self._proj_mats(name, f, idx)
        if f.info.kind == "embedding" or f.info.transposed:
            W = W.transpose(1, 2)  # (n, d_out, d_in): output side first
        if p_out is not None:
            W = p_out @ W
        if p_in is not None:
            W = W @ p_in.T
        return W.reshape(W.shape[0], -1)

    def query_block(self, bg: BatchGrads, cast: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Resident form of one batch of preconditioned queries (``{layer: {part: (n, ...)}}``);
        ``cast=False`` keeps the gradients' dtype (``precision="bf16"`` casts later)."""
        cast = self._cast if cast else (lambda t: t)
        cfg, comp = self.config, self.computer
        pre = None
        if not self.identity or cfg.projection == "dense":
            flat = bg.flat()
            pre = flat / self.lam if self.identity else self.curvature.solve(flat)
        if cfg.projection == "dense":
            return {"__proj__": {"w": cast(self._project_flat(pre))}}
        out = {}
        for idx, (name, f) in enumerate(bg.layers.items()):
            mode, info, e = self.plan["layers"][name]["mode"], f.info, {}
            if mode == "factored" and pre is None:  # ghost: the query's own factors
                e["L"], e["R"] = f.g / self.lam, f.a
            elif mode == "factored":
                W = self._layer_weights(name, f, pre)
                US, Vh = truncated_svd(W, self.plan["layers"][name]["rank"], cfg.seed + idx)
                US = US.transpose(1, 2)
                e["L"], e["R"] = (Vh, US) if info.kind == "embedding" or info.transposed else (US, Vh)
            elif mode == "projected":
                e["w"] = self._project_query(name, f, self._layer_weights(name, f, pre), idx)
            else:
                e["w"] = self._layer_weights(name, f, pre).reshape(bg.n, -1)
            if info.bias is not None:
                e["b"] = f.g.sum(1) / self.lam if pre is None else pre[:, comp.slices[info.bias]]
            out[name] = {k: cast(v) for k, v in e.items()}
        if comp.rest_layout is not None:
            rest = bg.rest / self.lam if pre is None else torch.cat([pre[:, comp.slices[n]] for n, _ in comp.rest_slices], 1)
            out[_REST] = {"w": cast(rest)}
        return out

    # ------------------------------------------------------------------------ training side
    def _factored(self, f: LayerFactors, L: torch.Tensor, R: torch.Tensor, tokens: bool = False) -> torch.Tensor:
        """``Σ_t Σ_k (g_tᵀL_ik)(R_ikᵀa_t)``, shape ``(q, B)``, chunked over examples; with
        ``tokens=True`` the terms of each token ``t`` kept apart, ``(q, B, T)``."""
        B, T, d_out = f.g.shape
        q, r = L.shape[0], L.shape[1]
        Lf, out = L.reshape(q * r, -1), []
        step = max(1, _CHUNK // max(1, T * q * r))
        for s in range(0, B, step):
            a, g = f.a[s : s + step], self._cast(f.g[s : s + step])
            b = g.shape[0]
            GL = g.reshape(b * T, d_out) @ Lf.T
            if f.info.kind != "embedding":
                AR = self._cast(a).reshape(b * T, -1) @ R.reshape(q * r, -1).T
            elif R.dtype == torch.long:  # ghost: one-hot inputs compare ids
                AR = (a.reshape(-1, 1) == R.reshape(1, -1)).to(GL.dtype)
            else:
                AR = R.reshape(q * r, -1).T[a.reshape(-1)]
            if f.info.kind == "embedding" and f.info.module.padding_idx is not None:
                AR = AR * (a.reshape(-1, 1) != f.info.module.padding_idx)
            if f.info.kind == "embedding" and R.dtype == torch.long and f.info.module.padding_idx is not None:
                AR = AR * (R.reshape(1, -1) != f.info.module.padding_idx)
            terms = (GL * AR).reshape(b, T, q, r)
            out.append(terms.sum(3).permute(2, 0, 1) if tokens else terms.sum((1, 3)).T)
        return torch.cat(out, 1)

    def _buffer(self, name, shape, like) -> torch.Tensor:
        key = (name, like.device)
        buf = self._bufs.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype:
            buf = self._bufs[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def score_batch(self, queries: dict, bg: BatchGrads) -> torch.Tensor:
        """Scores ``(q, B)`` of one training batch against all resident queries."""
        comp = self.computer
        if "__proj__" in queries:
            flat = bg.flat(self._buffer("__flat__", (bg.n, comp.layout.num_params), _first(bg)))
            Gp = self._cast(self._project_flat(flat))
            return (queries["__proj__"]["w"] @ Gp.T).to(self.score_dtype)
        total = None
        for _, s in self.layer_terms(queries, bg):
            total = s if total is None else total + s
        return total

    def layer_terms(self, queries: dict, bg: BatchGrads, by_parameter: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """The terms ``(name, (q, B) scores)`` whose sum is :meth:`score_batch`: one per hook
        layer (weight and bias), then the dense rest, in one GEMM (named ``_REST``) or, with
        ``by_parameter=True``, one per parameter (named by the parameter)."""
        comp, sd = self.computer, self.score_dtype
        for idx, (name, f) in enumerate(bg.layers.items()):
            e, mode = queries[name], self.plan["layers"][name]["mode"]
            if mode == "factored":
                s = self._factored(f, e["L"], e["R"])
            elif mode == "projected":
                s = e["w"] @ self._cast(self._project_train(name, f, idx)).T
            else:
                W = weight_grads(f, self._buffer(name, (bg.n, *comp.wshape[name]), f.g))
                s = e["w"] @ self._cast(W.reshape(bg.n, -1)).T
            s = s.to(sd)
            if "b" in e:
                s = s + (e["b"] @ self._cast(f.g.sum(1)).T).to(sd)
            yield name, s
        if _REST in queries:
            w, rest = queries[_REST]["w"], self._cast(bg.rest)
            if by_parameter:
                for pname, sl in comp.rest_slices:
                    yield pname, (w[:, sl] @ rest[:, sl].T).to(sd)
            else:
                yield _REST, (w @ rest.T).to(sd)

    # ------------------------------------------------------------------------ driving
    def query_groups(self, test_loader: Iterable[Any], n_total: int | None = None) -> Iterator[dict]:
        """Yields resident query groups (all queries in one group unless ``max_memory``).

        Each group is one set of tensors, filled batch by batch as the queries are prepared
        (no concatenation copies): at most one group and one batch of queries are resident,
        provided the caller drops a group before asking for the next one. A first reading pass
        (no gradients) counts the queries and refuses those with nothing measured.

        With ``aggregate``, yields one group: the mean (sum) of all the queries
        (:func:`influence._aggregate.aggregated_query`).

        Args:
            n_total: the number of queries, when the caller has counted them (checked).
        """
        n_total = self.count_queries(test_loader, n_total)
        if self.aggregate is not None:
            from ._aggregate import aggregated_query

            yield aggregated_query(self, test_loader, n_total)
            return
        group, count, size = None, 0, None
        for batch in track(iterate_batches(test_loader, "test_loader"), "test gradients", test_loader):
            with timed("influence_factors"):
                block = self.prepare_queries(batch, n_total)
            _check_finite_block(block, count)
            if size is None:
                size = self._group_size(block, _n(block), n_total)
            start, n = 0, _n(block)
            while start < n:
                if group is None:
                    group = _Group(block, min(size, max(n_total - count, 1)))
                take = min(n - start, group.free)
                group.put(block, start, start + take)
                start, count = start + take, count + take
                if group.free == 0:
                    full, group = group.parts, None
                    yield full
                    del full
        if group is not None:  # the loader yielded fewer queries than counted
            yield group.trimmed()

    def count_queries(self, test_loader: Iterable[Any], n_total: int | None = None) -> int:
        """Counts the queries in one reading pass (no gradients), refusing a loader whose
        queries all have nothing measured, and checks ``n_total`` when given."""
        task, counted, unmeasured = self.computer.task, 0, []
        for batch in iterate_batches(test_loader, "test_loader"):  # counts, and finds empty queries
            unmeasured += unmeasured_examples(task, batch, counted)
            counted += task.num_examples(batch)
        report_unmeasured(unmeasured, counted, "test", strict=True)
        if n_total is not None and n_total != counted:
            raise RuntimeError(
                f"The test loader yielded {counted} queries, but {n_total} were counted before: "
                "it must yield the same data on every pass."
            )
        return counted

    def prepare_queries(self, batch: Any, n_total: int, cast: bool = True) -> dict:
        """One batch of queries in resident form (plans the layers on the first batch)."""
        bg = self.computer.compute(batch, "measurement")
        if not self.plan:
            self._decide(bg, n_total)
        return self.query_block(bg, cast)

    def _group_size(self, block, n_block, n_total) -> int:
        per_query = sum(t.numel() * t.element_size() for e in block.values() for t in e.values()) / n_block
        self.plan["bytes_per_query"] = int(per_query)
        self.plan.update(group_size=n_total, resident_query_bytes=int(per_query * n_total), max_memory=self.config.max_memory)
        budget = self.config.max_memory
        if budget is None or per_query * n_total <= budget:
            return n_total
        fit = int(budget // per_query)
        if fit < 1:
            raise ValueError(
                f"max_memory={budget} bytes cannot hold even one query ({int(per_query)} bytes "
                "resident per query). Raise max_memory, or shrink queries with query_rank=... or "
                "projection='factored'."
            )
        groups = math.ceil(n_total / fit)
        size = math.ceil(n_total / groups)
        self.plan.update(query_groups=groups, group_size=size, resident_query_bytes=int(per_query * size))
        warnings.warn(
            f"max_memory={budget} bytes: {n_total} queries need {int(per_query * n_total)} bytes "
            f"resident; split into {groups} groups of at most {size} queries, i.e. {groups} passes "
            "over the training set.",
            UserWarning,
            stacklevel=4,
        )
        return size

    def columns(self, queries: dict, train_loader: Iterable[Any]) -> Iterator[torch.Tensor]:
        """Streams the training set once, yielding ``(q, B)`` score blocks."""
        offset = 0
        for batch in track(iterate_batches(train_loader, "train_loader"), "train gradients", train_loader):
            s = self.score_batch(queries, self.computer.compute(batch, "loss"))
            _check_finite_scores(s, offset)
            offset += s.shape[1]
            yield s

    def pairwise(self, test_loader, train_loader) -> torch.Tensor:
        """``(n_test, n_train)`` scores, one training pass per query group."""
        rows = []
        for queries in self.query_groups(test_loader):
            rows.append(torch.cat(list(self.columns(queries, train_loader)), 1))
            del queries  # before the next group is prepared
        return torch.cat(rows, 0)
