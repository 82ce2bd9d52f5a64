"""Pairwise scores split by module or by training token; the parts sum to the scores.

Both follow from the score being a sum: with ``q_i = (C + λI)⁻¹ ∇m(z_test_i)`` (the
preconditioned query, :mod:`influence.scoring`), ``score[i, j] = q_iᵀ ∇ℓ(z_j)``.

**Per module** (``pairwise_scores(..., per_module=True)``, shape ``(n_test, n_train, M)``, the
last axis in ``estimator.module_names_`` order, i.e. :attr:`gradient_coverage_` order)::

    score[i, j, m] = q_{i,m}ᵀ ∇_{θ_m} ℓ(z_j),        Σ_m score[i, j, m] = score[i, j]

with ``θ_m`` the attributed parameters of module ``m`` and ``q_{i,m}`` the query restricted to
them. For a block-diagonal curvature (Identity, Diagonal, K-FAC, EK-FAC) ``q_{i,m} =
(C_m + λI)⁻¹ ∇_{θ_m} m(z_test_i)`` depends on module ``m`` only, so ``score[i, j, m]`` is the
influence computed through that module alone. For a curvature that couples modules (Exact, CG,
Arnoldi, LiSSA, DataInf) ``q_{i,m}`` is the module-``m`` block of the jointly preconditioned
query: the split is an exact decomposition of the sum, not the influence of the module alone.
A weight tied to several layers counts once, under the module ``gradient_coverage_`` lists it
under.

**Per token** (``per_token=True``, language models, shape ``(n_test, n_train, T)`` with ``T``
the longest training sequence). On the hook path a layer's per-example weight gradient is a sum
over the positions of the sequence, ``∇_W ℓ(z_j) = Σ_t g_{j,t} a_{j,t}ᵀ``, where ``a_{j,t}`` is
the layer's input at position ``t`` and ``g_{j,t} = ∂ℓ(z_j)/∂(output at t)`` (the gradient of
the whole example's loss). The score of position ``t`` is its share of that sum::

    score[i, j, t] = Σ_layers ⟨Q_i^layer, g_{j,t} a_{j,t}ᵀ⟩ (+ ⟨q_i^bias, g_{j,t}⟩),
    Σ_t score[i, j, t] = score[i, j]

(Embedding: ``Q_i[id_{j,t}] · g_{j,t}``; LayerNorm: ``⟨q_i, g_{j,t} ⊙ x̂_{j,t}⟩``). This is
kronfluence's ``compute_per_token_scores`` and the token-wise attribution of Grosse et al.
(2023): it attributes the score to the activations of the training tokens, not to the loss
terms at those tokens (``g_{j,t}`` collects every later loss term that position ``t`` reaches
through attention). The per-loss-term split would need one backward pass per token and is not
offered. Position ``t`` is ``input_ids[j, t]``; positions past a batch's length are exactly 0,
and so are padding positions whose activations reach no loss term (right padding; with left
padding the last padding position predicts the first real token under
:class:`~influence.tasks.LanguageModelingTask` and keeps that term). Computed from the factors
``(a, g)`` the hook path has anyway: ghost/low-rank queries give the per-token terms for free
(the sum over ``t`` is skipped); dense queries cost ``B·T·q·d_in·d_out`` multiply-adds per layer
(the ``q·B·d_in·d_out`` GEMM of plain scoring times ``T``). Needs every attributed parameter on
the hook path (tied weights included); torch.func parameters see only whole examples.

Examples:
    >>> import torch
    >>> from influence import ClassificationTask, Identity, InfluenceEstimator
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))]
    >>> est = InfluenceEstimator(Identity(), ClassificationTask(), score_dtype=torch.float64).fit(model, data)
    >>> parts = est.pairwise_scores(data, per_module=True)
    >>> parts.shape, est.module_names_
    (torch.Size([5, 5, 2]), ('0', '2'))
    >>> torch.allclose(parts.sum(-1), est.pairwise_scores(data))
    True
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ._loader import iterate_batches
from ._progress import track
from .distributed import all_gather_counts
from .gradients.kernels import LayerFactors, matrix_shape
from .tasks import LanguageModelingTask

_CHUNK = 1 << 24  # elements of the largest temporary of a per-token kernel


def check_split(per_module: Any, per_token: Any, out: Any) -> str | None:
    """``None``, ``"module"`` or ``"token"`` from the keywords of ``pairwise_scores``."""
    for name, value in (("per_module", per_module), ("per_token", per_token)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False; got {value!r}.")
    if per_module and per_token:
        raise ValueError(
            "per_module=True and per_token=True cannot be combined: choose one split, "
            "(n_test, n_train, n_modules) or (n_test, n_train, T)."
        )
    split = "module" if per_module else "token" if per_token else None
    if split and out is not None:
        raise ValueError(
            f"per_{split}=True cannot be written to out=: the score file holds the "
            f"(n_test, n_train) matrix. Drop out= (the split scores are returned in memory), or "
            f"drop per_{split} to write the totals."
        )
    return split


def check_supported(split: str, scorer, task, train_loader: Iterable[Any]) -> None:
    """Refuses a split the configuration cannot give, before any gradient is scored."""
    if scorer.config.projection == "dense":
        raise ValueError(
            f"per_{split}=True is not available with projection='dense' (TRAK): it sketches "
            "the whole flat gradient at once, mixing every parameter. Use projection='factored' "
            "(per layer) or no projection."
        )
    if split != "token":
        return
    if not isinstance(task, LanguageModelingTask):
        raise ValueError(
            f"per_token=True splits scores over the tokens of language-model sequences, but the "
            f"task is {type(task).__name__}, not a LanguageModelingTask. Use per_module=True to "
            "split scores by module, or score with a LanguageModelingTask."
        )
    computer = scorer.computer
    computer.prepare(next(iterate_batches(train_loader, "train_loader")))
    if computer.func_layout is not None:
        coverage = computer.coverage()
        func = set(computer.func_layout.names)
        why = [f"{', '.join(p for p in e['parameters'] if p in func)} in module {m!r} ({e['reason']})"
               for m, e in coverage.items() if func & set(e["parameters"])]
        raise ValueError(
            "per_token=True needs every attributed parameter on the hook path, whose per-example "
            "gradients are sums over token positions; these parameters are computed by torch.func, "
            f"which sees whole examples only: {'; '.join(why)}. Leave them out of the attributed "
            "parameters (params=...), e.g. params='*lora_*' when only Linear adapters are trained."
        )


def module_index(computer) -> tuple[tuple[str, ...], dict[str, int]]:
    """Module names in coverage order, and ``{layer or parameter name: module position}``."""
    coverage = computer.coverage()
    names = tuple(coverage)
    index = {p: k for k, entry in enumerate(coverage.values()) for p in entry["parameters"]}
    index.update({name: index[info.weight] for name, info in computer.layers.items()})
    return names, index


def module_scores(scorer, queries: dict, bg, index: dict[str, int], n_modules: int) -> torch.Tensor:
    """``(q, B, n_modules)``: one training batch's scores, module by module."""
    out = None
    for name, s in scorer.layer_terms(queries, bg, by_parameter=True):
        if out is None:
            out = s.new_zeros((*s.shape, n_modules))
        out[..., index[name]] += s
    return out


def _bilinear(left: torch.Tensor, W: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left_tᵀ W_q right_t``: ``(B, T, m) × (q, m, n) × (B, T, n) → (q, B, T)``, chunked."""
    B, T, m = left.shape
    q, n = W.shape[0], right.shape[-1]
    if m <= n:  # contract the wider side in the GEMM, the narrower one elementwise
        M, small, wide, width = W.reshape(q * m, n).T, left.reshape(B * T, m), right.reshape(B * T, n), m
    else:
        M, small, wide, width = W.transpose(0, 1).reshape(m, q * n), right.reshape(B * T, n), left.reshape(B * T, m), n
    step = max(1, _CHUNK // max(1, q * width))
    out = [((wide[s : s + step] @ M).view(-1, q, width) * small[s : s + step, None]).sum(-1) for s in range(0, B * T, step)]
    return torch.cat(out).T.reshape(q, B, T)


def _weight_tokens(scorer, f: LayerFactors, W: torch.Tensor) -> torch.Tensor:
    """``(q, B, T)`` per-token terms of a dense query ``W (q, *matrix_shape)``."""
    info, g = f.info, scorer._cast(f.g)
    if info.kind == "embedding":
        ids, (B, T, D) = f.a.reshape(-1), g.shape
        step = max(1, _CHUNK // max(1, W.shape[0] * D))
        rows = [(W[:, ids[s : s + step]] * g.reshape(B * T, D)[s : s + step]).sum(-1) for s in range(0, B * T, step)]
        s = torch.cat(rows, 1).reshape(-1, B, T)
        if info.module.padding_idx is not None:
            s = s * (f.a != info.module.padding_idx)
        return s
    a = scorer._cast(f.a)
    if info.kind == "layernorm":
        return torch.einsum("qd,btd->qbt", W, g * a)
    return _bilinear(a, W, g) if info.transposed else _bilinear(g, W, a)


def token_scores(scorer, queries: dict, bg, T: int) -> torch.Tensor:
    """``(q, B, T)``: one training batch's scores, training token by training token."""
    from ._query_groups import _n
    from .scoring import _REST

    comp, sd, q = scorer.computer, scorer.score_dtype, _n(queries)
    total = None
    where = dict(comp.rest_slices)
    dense = [(name, f, queries[name], scorer.plan["layers"][name]["mode"]) for name, f in bg.layers.items()]
    dense += [(name, f, None, "tied") for name, f in bg.members.items()]
    for idx, (name, f, e, mode) in enumerate(dense):
        if f.g.shape[1] not in (0, T):
            raise ValueError(
                f"per_token=True: layer {name!r} sees {f.g.shape[1]} positions per example but the "
                f"sequences have {T} tokens, so its gradient cannot be split by token. Leave it out "
                "of the attributed parameters (params=...)."
            )
        if f.g.shape[1] == 0:  # not used by this batch
            continue
        if mode == "tied":
            w = queries[_REST]["w"]
            s = _weight_tokens(scorer, f, w[:, where[f.info.weight]].view(q, *matrix_shape(f.info)))
            bias = None if f.info.bias is None else w[:, where[f.info.bias]]
        else:
            if mode == "factored":
                s = scorer._factored(f, e["L"], e["R"], tokens=True)
            elif mode == "projected":
                g, a = scorer.projected_factors(name, f, idx)
                s = _bilinear(scorer._cast(g), e["w"].view(q, g.shape[-1], a.shape[-1]), scorer._cast(a))
            else:
                s = _weight_tokens(scorer, f, e["w"].view(q, *comp.wshape[name]))
            bias = e.get("b")
        if bias is not None:
            s = s + torch.einsum("qd,btd->qbt", bias, scorer._cast(f.g))
        total = s.to(sd) if total is None else total + s.to(sd)
    if total is None:  # no layer ran on this batch
        like = next(t for e in queries.values() for t in e.values())
        total = torch.zeros(q, bg.n, T, dtype=sd, device=like.device)
    return total


def split_pairwise(scorer, test_loader: Iterable[Any], train_loader: Iterable[Any], split: str) -> torch.Tensor:
    """``(n_test, n_train, K)`` scores split by module or token, one training pass per query group."""
    from ._guards import check_finite
    from ._query_groups import _n

    comp = scorer.computer
    names, index = module_index(comp)
    comp.keep_tie_factors = split == "token"
    rows = []
    try:
        for queries in scorer.query_groups(test_loader):
            blocks, offset = [], 0
            for batch in track(iterate_batches(train_loader, "train_loader"), "train gradients", train_loader):
                bg = comp.compute(batch, "loss")
                if split == "module":
                    s = module_scores(scorer, queries, bg, index, len(names))
                else:
                    s = token_scores(scorer, queries, bg, batch["input_ids"].shape[1])
                del bg
                check_finite(s.transpose(0, 1), offset, "train")
                offset += s.shape[1]
                blocks.append(s)
            like = next(t for e in queries.values() for t in e.values())
            rows.append((_n(queries), blocks, like.device))
            del queries  # before the next group is prepared
    finally:
        comp.keep_tie_factors = False
    width = len(names) if split == "module" else max([b.shape[2] for _, blocks, _ in rows for b in blocks] or [0])
    width = max(all_gather_counts(width))  # the ranks' longest sequences
    return torch.cat([_columns(n, blocks, width, scorer.score_dtype, device) for n, blocks, device in rows], 0)


def _columns(n: int, blocks: list[torch.Tensor], width: int, dtype, device) -> torch.Tensor:
    """One query group's ``(n, n_train, width)`` scores: the blocks zero-padded to ``width``."""
    if not blocks:  # an empty shard of the training set
        return torch.zeros(n, 0, width, dtype=dtype, device=device)
    pad = torch.nn.functional.pad
    return torch.cat([pad(b, (0, width - b.shape[2])) if b.shape[2] < width else b for b in blocks], 1)
