"""Stock GPT-2 with ``wte`` tied to ``lm_head``: per-example gradients and ghost self-scores by
the hook path with the tie summed, against the tied weight on torch.func (the behaviour before
tie summation) and against torch.func for everything, side by side.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_tied.py          # writes results/
    PYTHONPATH=. python benchmarks/bench_tied.py --smoke                    # tiny, for CI

Three ways to the same ``(B, P)`` gradients, all attributed parameters:

- ``tie summed``: :class:`GradientComputer` as it runs now: ``wte`` captured with ``lm_head``,
  their contributions summed; no torch.func pass at all;
- ``wte on func``: the hook path for every other parameter plus a torch.func (vmap) pass for
  ``wte`` alone, written into the same buffer (what the plan did before ties were summed);
- ``all func``: torch.func for every parameter (``gradient_method="func"``).

Ghost self-scores (what ``InfluenceEstimator(Identity()).self_scores()`` computes per batch):
``‖∇ℓ_b‖²`` from the factored layers plus the dense block, by the same three routes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from _common import environment, side_by_side, sync, result_name, smoke_cli, write
from influence import LanguageModelingTask, select_parameters
from influence.gradients.functional import per_sample_grads
from influence.gradients.hooks import GradientComputer
from influence.params import ParameterLayout

TIED = "transformer.wte.weight"


def gpt2(vocab: int, n_embd: int, n_layer: int, T: int):
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=T, n_embd=n_embd, n_layer=n_layer, n_head=4,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def cases(smoke: bool):
    if smoke:
        yield "gpt2 V=64", dict(vocab=64, n_embd=16, n_layer=1, T=8), 2
        return
    yield "gpt2 V=2048", dict(vocab=2048, n_embd=128, n_layer=2, T=64), 8
    yield "gpt2 V=8192", dict(vocab=8192, n_embd=128, n_layer=2, T=64), 8


def run(smoke: bool, out_dir: Path, device: str = "cpu") -> dict:
    rows, raw = [], {}
    task = LanguageModelingTask()
    for name, cfg, B in cases(smoke):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' config remarks
            model = gpt2(**cfg).to(device)
        ids = torch.randint(0, cfg["vocab"], (B, cfg["T"]), device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        layout = select_parameters(model)
        assert layout.names[0] == TIED  # the tied weight leads the layout: (b) fills the rest after it
        tied_numel = layout.numels[0]
        others = ParameterLayout(layout.names[1:], layout.shapes[1:])
        wte = ParameterLayout(layout.names[:1], layout.shapes[:1])
        summed = GradientComputer(model, task, layout)
        hooks_without_wte = GradientComputer(model, task, others)
        everything_func = GradientComputer(model, task, layout, method="func")
        buf = torch.empty(B, layout.num_params, device=device)

        def tie_summed():
            summed.flat(batch, out=buf); sync(device)

        def wte_on_func():
            hooks_without_wte.flat(batch, out=buf[:, tied_numel:])
            buf[:, :tied_numel] = per_sample_grads(model, task, batch, wte); sync(device)

        def all_func():
            everything_func.flat(batch, out=buf); sync(device)

        def norms_tie_summed():
            return summed.compute(batch).sq_norms()

        def norms_wte_on_func():
            return hooks_without_wte.compute(batch).sq_norms() + per_sample_grads(model, task, batch, wte).pow(2).sum(1)

        def norms_all_func():
            return everything_func.compute(batch).sq_norms()

        results = {}
        for label, fn in (("tie_summed", tie_summed), ("wte_on_func", wte_on_func), ("all_func", all_func)):
            fn()
            results[label] = buf.clone()
        ref = results["all_func"]
        err = {k: float((v - ref).abs().max() / ref.abs().max()) for k, v in results.items()}
        norms = {k: f() for k, f in (("tie_summed", norms_tie_summed), ("wte_on_func", norms_wte_on_func), ("all_func", norms_all_func))}
        norm_err = max(float((v - norms["all_func"]).abs().max() / norms["all_func"].abs().max()) for v in norms.values())
        reps = 1 if smoke else 7
        t = side_by_side({"tie_summed": tie_summed, "wte_on_func": wte_on_func, "all_func": all_func,
                          "norms_tie_summed": norms_tie_summed, "norms_wte_on_func": norms_wte_on_func,
                          "norms_all_func": norms_all_func}, reps)
        raw[name] = {"config": cfg, "batch": B, "params": layout.num_params, "tied_params": tied_numel, "seconds": t,
                     "max_rel_err_vs_all_func": err, "self_scores_max_rel_err": norm_err,
                     "func_layout": None if summed.func_layout is None else list(summed.func_layout.names),
                     "coverage_wte": summed.coverage()["transformer.wte"]}
        rows.append({"model": name, "B": B, "T": cfg["T"], "params": layout.num_params, "tied params": tied_numel,
                     "tie summed s": t["tie_summed"], "wte on func s": t["wte_on_func"], "all func s": t["all_func"],
                     "speed-up vs wte on func": t["wte_on_func"] / t["tie_summed"],
                     "speed-up vs all func": t["all_func"] / t["tie_summed"],
                     "self-scores: tie summed s": t["norms_tie_summed"],
                     "self-scores speed-up vs wte on func": t["norms_wte_on_func"] / t["norms_tie_summed"],
                     "self-scores speed-up vs all func": t["norms_all_func"] / t["norms_tie_summed"],
                     "max rel err": max(err.values()), "self-scores rel err": norm_err})
        print(rows[-1], flush=True)
    payload = {"environment": environment(), "device": device, "smoke": smoke, "results": raw}
    notes = ("Per-example gradients (B, P) of stock GPT-2 (eager attention, every parameter attributed, float32) "
             "written into a reused buffer, median of runs interleaved round-robin. 'tie summed': wte and lm_head "
             "captured, their contributions summed on the hook path, no torch.func pass. 'wte on func': the hook path "
             "for the other parameters plus a vmap pass for wte alone (the plan before ties were summed). 'all func': "
             "torch.func for everything. Self-scores: ghost norms ||grad||^2 per example by the same routes "
             "(Identity's self_scores). Speed-ups are time ratios (> 1: tie summed is faster).")
    write(result_name("bench_tied", smoke, device), payload, rows, out_dir, notes)
    return payload


if __name__ == "__main__":
    smoke_cli(run, device=True)
