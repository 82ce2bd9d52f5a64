"""Dense float64 oracles computed the slow, obvious way (loops of autograd).

They share no code with the library beyond the Task's per-example loss, so a wrong library
implementation cannot agree with them by construction.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map


def take(batch, i):
    """Example ``i`` of a batch, kept as a batch of one."""
    n = _batch_len(batch)
    return tree_map(lambda t: t[i : i + 1] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t, batch)


def _batch_len(batch):
    from torch.utils._pytree import tree_flatten

    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    raise ValueError("no tensor")


def params_of(model, names=None):
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    return names, [named[n] for n in names]


def loop_grads(model, fn, batch, names=None):
    """``(B, P)``: one ``torch.autograd.grad`` call per example."""
    names, params = params_of(model, names)
    rows = []
    for i in range(_batch_len(batch)):
        out = fn(model, take(batch, i))
        assert out.shape == (1,)
        gs = torch.autograd.grad(out.sum(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)



def dense_hessian(model, task, loader, names=None):
    """Mean over examples of ``∇²ℓ`` via ``torch.autograd.functional.hessian`` per example."""
    names, params = params_of(model, names)
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    total, count = 0, 0
    for batch in loader:
        for i in range(_batch_len(batch)):
            ex = take(batch, i)

            def f(flat):
                pieces = torch.split(flat, [s.numel() for s in shapes])
                p = {n: x.reshape(s) for n, x, s in zip(names, pieces, shapes)}
                return torch.func.functional_call(_Wrap(model, task), {"m." + k: v for k, v in p.items()}, (ex,), strict=False).sum()

            total = total + torch.autograd.functional.hessian(f, theta)
            count += 1
    return total / count


def dense_ggn(model, task, loader, names=None):
    """Mean over examples of ``Jᵀ H_out J`` with explicit Jacobians and output Hessians."""
    names, params = params_of(model, names)
    total, count = 0, 0
    for batch in loader:
        for i in range(_batch_len(batch)):
            ex = take(batch, i)
            out = task.forward(model, ex)
            flat_out = out.reshape(-1)
            J = torch.stack([
                torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(torch.autograd.grad(flat_out[k], params, retain_graph=True, allow_unused=True), params)])
                for k in range(flat_out.numel())
            ])
            targets = task.targets(ex)
            H = torch.autograd.functional.hessian(lambda o: task.output_loss(o.reshape(out.shape), targets, ex).sum(), flat_out.detach())
            total = total + J.T @ H @ J
            count += 1
    return total / count


def dense_fisher(model, task, loader, names=None):
    """Empirical Fisher: mean of per-example gradient outer products (data labels)."""
    rows = torch.cat([loop_grads(model, task.loss, b, names) for b in loader])
    return rows.T @ rows / rows.shape[0]


class _Wrap(torch.nn.Module):
    def __init__(self, model, task):
        super().__init__()
        self.m = model
        self.task = task

    def forward(self, batch):
        return self.task.loss(self.m, batch)


def double_backward_products(model, task, batch, V, kind, names=None):
    """``(Σ_b C_b) v`` for each row ``v`` of ``V`` by plain reverse-mode autograd on the
    model's own parameters, one vector at a time (no torch.func, no functional_call).

    Hessian: ``∇⟨∇ℓ, v⟩``. GGN: ``J v = ∇_u ⟨Jᵀu, v⟩`` (``Jᵀu`` is linear in ``u``), then the
    output Hessian by double backward, then ``Jᵀ`` by one more backward.
    """
    names, params = params_of(model, names)
    sizes = [p.numel() for p in params]

    def split(v):
        return [x.reshape(p.shape) for x, p in zip(torch.split(v, sizes), params)]

    def flat(gs):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])

    rows = []
    if kind == "hessian":
        grads = torch.autograd.grad(task.loss(model, batch).sum(), params, create_graph=True)
        for v in V:
            rows.append(flat(torch.autograd.grad(grads, params, split(v), retain_graph=True, allow_unused=True)))
        return torch.stack(rows)
    out = task.forward(model, batch)
    u = torch.zeros_like(out, requires_grad=True)
    pulled = torch.autograd.grad(out, params, u, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(pulled) if g is not None]
    frozen = out.detach().requires_grad_(True)
    (out_grad,) = torch.autograd.grad(task.output_loss(frozen, task.targets(batch), batch).sum(), frozen, create_graph=True)
    for v in V:
        pieces = split(v)
        (jv,) = torch.autograd.grad([pulled[i] for i in used], u, [pieces[i] for i in used], retain_graph=True)
        (hjv,) = torch.autograd.grad(out_grad, frozen, jv, retain_graph=True)
        rows.append(flat(torch.autograd.grad(out, params, hjv, retain_graph=True, allow_unused=True)))
    return torch.stack(rows)
