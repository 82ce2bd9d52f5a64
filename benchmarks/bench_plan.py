"""What the safety checks cost at fit: the layer plan (use and axis probes), the self-check and the
stochasticity check, against one batch of per-example gradients, side by side.

    PYTHONPATH=.:benchmarks OMP_NUM_THREADS=1 python benchmarks/bench_plan.py    # writes results/
    PYTHONPATH=.:benchmarks python benchmarks/bench_plan.py --smoke              # tiny, for CI

Per model (the TinyLM of the other benchmarks, an MLP, a CNN), timed round-robin:

- ``plan``: :func:`~influence.gradients.plan.plan_layers` without the self-check (a forward
  under the use recorder at 2 examples, a forward at 3, and a third if a shared input must be
  confirmed);
- ``plan + self-check``: the same plus the hook path on the whole first batch and an autograd
  loop over two of its examples;
- ``stochasticity check``: the first batch's loss twice, under ``no_grad`` (run at fit and at
  every scoring call);
- ``one batch``: ``GradientComputer.flat`` of the first batch, the unit of comparison.

The plan is cached per model, so the timings clear the cache before each call: a fit pays this
once; scoring after it pays only the stochasticity check.
"""

from __future__ import annotations

from pathlib import Path

import torch

from _common import CNN, environment, lm, lm_batch, mlp, side_by_side, result_name, smoke_cli, write
from influence import ClassificationTask, LanguageModelingTask, select_parameters
from influence._guards import check_deterministic
from influence.gradients import plan as plans
from influence.gradients.capture import hookable_layers
from influence.gradients.hooks import GradientComputer


def cases(smoke: bool):
    g = torch.Generator().manual_seed(0)
    if smoke:
        yield "mlp", mlp(d_in=8, hidden=8), ClassificationTask(), (torch.randn(4, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
        return
    yield "lm 4x256 B=8 T=64", lm(), LanguageModelingTask(), lm_batch(8, 64, 2048)
    yield "mlp 784-512-512-10 B=128", mlp(), ClassificationTask(), (torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g))
    yield "cnn B=32 32x32", CNN(), ClassificationTask(), (torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))


def run(smoke: bool, out_dir: Path) -> dict:
    rows, raw = [], {}
    for name, model, task, batch in cases(smoke):
        torch.manual_seed(0)
        model.eval()
        layout = select_parameters(model)
        candidates = hookable_layers(model, layout)
        computer = GradientComputer(model, task, layout)
        computer.prepare(batch)

        def planned(self_check):
            def go():
                plans._CACHE.clear()
                plans.plan_layers(model, task, layout, candidates, batch, self_check)
            return go

        t = side_by_side({
            "plan": planned(False),
            "plan + self-check": planned(True),
            "stochasticity check": lambda: check_deterministic(model, task, batch, "training"),
            "one batch": lambda: computer.flat(batch),
        }, repeats=1 if smoke else 5)
        raw[name] = {"seconds": t, "params": layout.num_params, "hook_layers": len(computer.layers)}
        unit = t["one batch"]
        rows.append({"model": name, "one batch s": unit, "plan / batch": t["plan"] / unit,
                     "plan + self-check / batch": t["plan + self-check"] / unit,
                     "stochasticity check / batch": t["stochasticity check"] / unit})
        print(rows[-1], flush=True)
    payload = {"environment": environment(), "smoke": smoke, "results": raw}
    notes = ("Ratios to one batch of per-example gradients (GradientComputer.flat), median of runs "
             "interleaved round-robin. A fit pays 'plan + self-check' once (the plan is cached per "
             "model) and the stochasticity check once; every scoring call pays the stochasticity check.")
    write(result_name("bench_plan", smoke), payload, rows, out_dir, notes)
    return payload


if __name__ == "__main__":
    smoke_cli(run)
