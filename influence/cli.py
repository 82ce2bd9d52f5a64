"""The ``influence`` command: ``influence demo`` (the study in miniature; see :data:`DEMO_HELP`)
and ``influence study`` (the study on your data and model; see :mod:`influence.study.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from typing import Iterator, Sequence

DEMO_HELP = """\
Reproduces, in miniature and on a CPU, the experiments of Li, Zhao, Li & Sun, "Do Influence
Functions Work on Large Language Models?" (arXiv 2409.19998): a tiny language model
pretrained on a generated corpus, LoRA fine-tuning on three task families (harmful data,
class attribution, backdoor), and attribution by every available method, scored by Acc,
Cover and AUC. It prints the tables and writes a report folder (report.md, results.json,
plots). Nothing is downloaded."""

DEMO_EXAMPLES = """\
examples:
  influence demo --quick      a tiny run first (under a minute on 2 CPU cores)
  influence demo              everything at the default size (a few minutes on 2 cores)
  influence demo --task harmful --methods identity exact repsim --epochs 5 --out report
"""


#: The demo's intra-op threads: measured in benchmarks/results/bench_busy_demo.md (docs/demo.md,
#: "On a busy machine"), one thread costs little on an idle machine and avoids the many-fold
#: slowdown of multithreaded small operations when other processes take the cores.
DEMO_THREADS = 1


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"invalid thread count {text!r}: expected an integer >= 1, or 0 for torch's default")
    return value


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(threads)`` (``0``: leaves torch's setting)
    and restores the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _demo_parser(sub) -> None:
    from .demo.families import FAMILIES
    from .demo.methods import METHODS
    from .demo.pipeline import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="the study in miniature: tiny LM + LoRA, three task families",
                       description=DEMO_HELP, epilog=DEMO_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", nargs="+", choices=tuple(FAMILIES), default=None, metavar="TASK",
                   help=f"task families to run (default: all: {' '.join(FAMILIES)})")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None, metavar="METHOD",
                   help=f"attribution methods (default: all: {' '.join(METHODS)})")
    p.add_argument("--epochs", type=int, default=None, help=f"fine-tuning epochs (default {d.epochs})")
    p.add_argument("--scale", type=float, default=None,
                   help=f"fraction of the study's per-class counts (default {d.scale}; 1 = study size)")
    p.add_argument("--queries", type=int, default=None, help=f"queries per task (default {d.n_queries})")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="influence-demo", help="report folder (default ./influence-demo)")
    p.add_argument("--cache", default=None,
                   help="cache folder of the pretrained base model (default ~/.cache/influence "
                   "or $INFLUENCE_CACHE)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretraining steps of the base model (default 600; --quick: 150)")
    p.add_argument("--threads", type=_threads, default=DEMO_THREADS,
                   help=f"torch intra-op CPU threads (default {DEMO_THREADS}: at the demo's sizes more "
                   "threads save little on an idle machine and cost many times over when other "
                   "processes keep the cores busy; 0: torch's default, one per core)")
    p.add_argument("--lora", choices=("builtin", "peft"), default="builtin",
                   help="LoRA implementation: the built-in wrapper (default) or peft (optional)")
    p.add_argument("--no-controls", dest="controls", action="store_false",
                   help="skip the control rows (the same methods before fine-tuning and on queries "
                   "with another class's response)")
    p.add_argument("--control-methods", nargs="+", choices=tuple(METHODS), default=None,
                   metavar="METHOD",
                   help="methods that get control rows (default: every method of the run but "
                   "lissa, the slowest)")
    p.add_argument("--control-init", choices=("random", "base"), default=d.control_init,
                   help="the model of the before-fine-tuning control: a randomly initialised "
                   f"TinyLM (random) or the pretrained base model (base); LoRA at its "
                   f"initialisation either way (default {d.control_init})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data, the pretraining and the fine-tuning (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run: smaller data, fewer epochs, short pretraining")
    progress_options(p)


def progress_options(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: bars only when stderr is a terminal)."""
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="show progress bars (default: only when stderr is a terminal)")
    bars.add_argument("--no-progress", dest="progress", action="store_false",
                      help="never show progress bars")


def demo_config(args: argparse.Namespace):
    """The :class:`~influence.demo.pipeline.DemoConfig` of parsed ``demo`` arguments."""
    from .demo.pipeline import DemoConfig
    from .demo.pretrain import PretrainConfig

    config = DemoConfig(device=args.device, seed=args.seed, lora_backend=args.lora,
                        controls=args.controls, control_init=args.control_init)
    if args.quick:
        config = dataclasses.replace(
            config, scale=0.05, n_queries=10, epochs=4, checkpoints=(2,),
            pretrain=PretrainConfig(steps=150, seed=args.seed))
    else:
        config.pretrain = dataclasses.replace(config.pretrain, seed=args.seed)
    updates = {"tasks": args.task, "methods": args.methods, "epochs": args.epochs,
               "scale": args.scale, "n_queries": args.queries, "control_methods": args.control_methods}
    config = dataclasses.replace(config, **{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in updates.items() if v is not None})
    if args.pretrain_steps is not None:
        config.pretrain = dataclasses.replace(config.pretrain, steps=args.pretrain_steps)
    if config.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1; got {config.epochs}.")
    if not 0 < config.scale <= 1:
        raise SystemExit(f"--scale must be in (0, 1]; got {config.scale}.")
    return config


def run_demo_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .demo.pipeline import run_demo
    from .demo.report import summary, write_report

    config = demo_config(args)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with torch_threads(args.threads):
        results = run_demo(config, cache_dir=args.cache, progress=progress, log=tqdm.write)
    print()
    print(summary(results))
    out = write_report(results, args.out)
    print(f"\nreport written to {out}/ (report.md, results.json"
          + (", plots" if any(out.glob("*.png")) else "") + ")")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``influence`` console script."""
    from .study.cli import run_study_command, study_parser

    parser = argparse.ArgumentParser(prog="influence", description="Training-data attribution "
                                     "with influence functions. Run 'influence demo --help' or "
                                     "'influence study --help'.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    _demo_parser(sub)
    study_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "study":
        return run_study_command(args)
    return run_demo_command(args)


if __name__ == "__main__":
    sys.exit(main())
