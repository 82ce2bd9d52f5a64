"""Per-example gradients, examples/s: naive loop, torch.func vmap, ours (hook path), and one
ordinary batched backward with parameter gradients (the physical reference), side by side.

    PYTHONPATH=. python benchmarks/bench_grads.py            # full size, writes results/
    PYTHONPATH=. python benchmarks/bench_grads.py --smoke    # tiny, for CI (no timing claims)
"""

from __future__ import annotations

from pathlib import Path

import torch

from _common import CNN, environment, lm, lm_batch, mlp, side_by_side, sync, to, result_name, smoke_cli, write
from influence import ClassificationTask, LanguageModelingTask, select_parameters
from influence.gradients.functional import per_sample_grads
from influence.gradients.hooks import GradientComputer


def cases(smoke: bool, device):
    if smoke:
        yield "mlp", mlp(20, 16, 2, 5), ClassificationTask(), (torch.randn(8, 20), torch.randint(0, 5, (8,))), 1
        yield "cnn", CNN(4, 8, 5), ClassificationTask(), (torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))), 1
        yield "lm", lm(64, 16, 1, 2, 32, 16), LanguageModelingTask(), lm_batch(4, 16, 64), 16
        return
    yield "mlp", mlp(784, 512, 2, 10), ClassificationTask(), (torch.randn(128, 784), torch.randint(0, 10, (128,))), 1
    yield "cnn", CNN(32, 64, 10), ClassificationTask(), (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), 32 * 32
    yield "lm", lm(), LanguageModelingTask(), lm_batch(8, 64, 2048), 64
    yield "lm B=32", lm(), LanguageModelingTask(), lm_batch(32, 64, 2048), 64  # vmap's cost grows faster with B


def run(smoke: bool, out_dir: Path, device: str = "cpu", dtype=torch.float32) -> dict:
    rows, raw = [], {}
    for name, model, task, batch, T in cases(smoke, device):
        torch.manual_seed(0)
        model = model.to(device=device, dtype=dtype).eval()
        batch = to(batch, device)
        if not isinstance(batch, dict):
            batch = (batch[0].to(dtype), batch[1])
        layout = select_parameters(model)
        B = task.num_examples(batch)
        comp = GradientComputer(model, task, layout, "hooks")
        buf = torch.empty(B, layout.num_params, dtype=dtype, device=device)
        params = [p for p in model.parameters()]

        def ours():
            comp.flat(batch, out=buf); sync(device)

        def factors_only():
            comp.compute(batch); sync(device)

        def vmap():
            per_sample_grads(model, task, batch, layout); sync(device)

        def loop():
            for i in range(B):
                one = {k: v[i : i + 1] for k, v in batch.items()} if isinstance(batch, dict) else (batch[0][i : i + 1], batch[1][i : i + 1])
                torch.autograd.grad(task.loss(model, one).sum(), params)
            sync(device)

        def backward():
            torch.autograd.grad(task.loss(model, batch).sum(), params); sync(device)

        def write_floor():  # writing the (B, P) output once: the memory floor of materialising
            buf.fill_(0.0); sync(device)

        ref = per_sample_grads(model, task, batch, layout)
        err = float((comp.flat(batch) - ref).abs().max() / ref.abs().max())
        reps = 1 if smoke else 5
        fns = {"loop": loop, "vmap": vmap, "ours": ours, "ours_factors_only": factors_only, "batched_backward": backward, "write_floor": write_floor}
        if not smoke and name.startswith("lm"):
            reps = 3
        t = side_by_side(fns, reps)
        eps = {k: B / v for k, v in t.items()}
        raw[name] = {"batch": B, "tokens": T, "params": layout.num_params, "seconds": t, "examples_per_s": eps, "max_rel_err_vs_vmap": err,
                     "hook_layers": list(comp.layers), "func_params": comp.rest_layout.num_params if comp.rest_layout else 0}
        rows.append({"model": name, "params": layout.num_params, "B": B, "T": T,
                     "loop ex/s": eps["loop"], "vmap ex/s": eps["vmap"], "ours ex/s": eps["ours"],
                     "ours/vmap": eps["ours"] / eps["vmap"], "ours/loop": eps["ours"] / eps["loop"],
                     "ours time / batched backward": t["ours"] / t["batched_backward"],
                     "factors only / backward": t["ours_factors_only"] / t["batched_backward"],
                     "ours / (backward + write floor)": t["ours"] / (t["batched_backward"] + t["write_floor"]),
                     "write floor / backward": t["write_floor"] / t["batched_backward"], "rel err": err})
        print(rows[-1], flush=True)
    payload = {"environment": environment(), "device": device, "smoke": smoke, "results": raw}
    notes = ("Targets (2 CPU cores): ours >= 5x vmap on the MLP, >= 2x on the LM, ours within 2x of one batched "
             "backward with parameter gradients. 'ours' materialises (B, P) into a reused buffer; "
             "'factors only' is the capture pass (what ghost/low-rank scoring uses). 'write floor' is one fill_ of the "
             "(B, P) output buffer: materialising cannot take less than one backward plus that write.")
    write(result_name("bench_grads", smoke, device), payload, rows, out_dir, notes)
    return payload


if __name__ == "__main__":
    smoke_cli(run, device=True)
