"""``influence study``: the command-line face of :func:`influence.study.run_study`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

STUDY_HELP = """\
Asks the question of Li, Zhao, Li & Sun, "Do Influence Functions Work on Large Language
Models?" (arXiv 2409.19998) on your data and model: fine-tunes LoRA adapters of a causal LM on
your prompt/response examples, scores every (test query, training example) pair by each
method, and measures whether the top-scored training examples have the query's class (Acc,
Cover, AUC), next to two controls (the model before fine-tuning; queries with another class's
response). Writes OUT/results.json, OUT/report.md, OUT/scores/<method>.npy (n_queries x
n_train, positive = helpful) and OUT/top_examples.jsonl. See docs/study.md.

--data DIR holds a train and a test split, each a datasets save_to_disk folder (DIR/train/),
DIR/train.jsonl or DIR/train.csv, with a prompt, a response and a label per row."""

STUDY_EXAMPLES = """\
examples:
  influence study --data my_data                     built-in tiny model, offline, minutes on a CPU
  influence study --data my_data --model ./llama-7b --device cuda --dtype bfloat16 --queries 100
  influence study --data emotion --fields prompts,response,variation --loss full \\
                  --methods identity,datainf,lissa_paper,repsim --epochs 3 --out study
  influence study --data my_data --model ./base --adapter ./study/adapter   (no fine-tuning)
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 2,8,16; got {text!r}") from None


def study_parser(sub) -> None:
    """Adds the ``study`` subcommand to the ``influence`` parser."""
    from ..cli import progress_options
    from ..demo.methods import METHODS
    from .batches import LOSSES
    from .config import DEFAULT_METHODS, HF_LR, TINYLM_LR, StudyConfig
    from .models import DTYPES

    d = StudyConfig()
    p = sub.add_parser("study", help="the study on your data and model: LoRA fine-tuning, "
                       "attribution by every method, Acc/Cover/AUC with controls",
                       description=STUDY_HELP, epilog=STUDY_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR",
                   help="folder with the train and test splits (save_to_disk folders, .jsonl or .csv)")
    p.add_argument("--fields", default=",".join(d.fields), metavar="PROMPT,RESPONSE,LABEL",
                   help=f"names of the prompt, response and label fields (default {','.join(d.fields)})")
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="HuggingFace causal LM: a save_pretrained folder with its tokenizer, or a hub "
                   "id (default: the built-in TinyLM pretrained on the training text)")
    p.add_argument("--adapter", default=None, metavar="PATH",
                   help="attribute this saved peft LoRA adapter of --model as is (no fine-tuning)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="training loss: response = next-token loss on the response only, padding "
                   "masked (default); full = labels are input_ids over the whole padded sequence, "
                   "padding included, as in the study's code")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"comma- or space-separated methods (default {','.join(DEFAULT_METHODS)}; "
                   f"available: {','.join(METHODS)})")
    p.add_argument("--queries", type=int, default=None, metavar="N",
                   help="attribute a seeded sample of N test examples (default: all)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"fine-tuning epochs (default {d.epochs})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default {HF_LR:g} with --model, {TINYLM_LR:g} for the TinyLM)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"examples per batch for fine-tuning and gradients (default {d.batch_size})")
    p.add_argument("--lora-r", type=int, default=d.lora.r, help=f"LoRA rank (default {d.lora.r})")
    p.add_argument("--lora-alpha", type=float, default=d.lora.alpha,
                   help=f"LoRA alpha; the update is scaled by alpha / r (default {d.lora.alpha:g})")
    p.add_argument("--lora-dropout", type=float, default=d.lora.dropout,
                   help=f"LoRA dropout (default {d.lora.dropout:g})")
    p.add_argument("--lora-targets", type=_csv, default=None, metavar="NAME,...",
                   help="modules to adapt, by last name component or glob of the full name (default: "
                   "the attention query and value projections: q_proj,v_proj; c_attn for GPT-2; ...)")
    p.add_argument("--lora-layers", type=_ints, default=None, metavar="I,...",
                   help="adapt only these layers, e.g. 2,8,16,31 (default: all)")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"tokens per example at most; longer prompts lose their end (default {d.max_length})")
    p.add_argument("--damping-ratio", type=float, default=d.damping_ratio,
                   help="damping of the curvature methods: lambda = ratio * mean |grad|^2 / P "
                   f"(default {d.damping_ratio:g})")
    p.add_argument("--no-controls", dest="controls", action="store_false",
                   help="skip the two control rows (before fine-tuning; swapped responses)")
    p.add_argument("--device", default=d.device, help=f"torch device, e.g. cuda (default {d.device})")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype,
                   help=f"precision of the model weights (default {d.dtype})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the query sample, the adapters and the batch order (default 0)")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain.steps,
                   help=f"pretraining steps of the built-in TinyLM (default {d.pretrain.steps})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="influence-study", help="output folder (default ./influence-study)")
    progress_options(p)


def study_config(args: argparse.Namespace):
    """The :class:`~influence.study.StudyConfig` of parsed ``study`` arguments."""
    from .config import DEFAULT_METHODS, StudyConfig
    from .lora import LoraSettings

    d = StudyConfig()
    methods = [m for item in (args.methods or [",".join(DEFAULT_METHODS)]) for m in _csv(item)]
    return StudyConfig(
        data=args.data, model=args.model, adapter=args.adapter, fields=args.fields, loss=args.loss,
        methods=tuple(methods), queries=args.queries, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, damping_ratio=args.damping_ratio,
        lora=LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout,
                          tuple(args.lora_targets) if args.lora_targets else None, args.lora_layers),
        controls=args.controls, device=args.device, dtype=args.dtype, seed=args.seed, out=args.out,
        pretrain=dataclasses.replace(d.pretrain, steps=args.pretrain_steps, seed=args.seed),
    ).checked()


def run_study_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..cli import torch_threads
    from .outputs import summary
    from .run import run_study

    try:
        config = study_config(args)
    except ValueError as error:
        raise SystemExit(f"influence study: {error}") from None
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        with torch_threads(args.threads or 0):  # restored afterwards, as for the demo
            result = run_study(config, progress=progress, log=tqdm.write)
    except (ValueError, FileNotFoundError, ImportError, OSError) as error:
        raise SystemExit(f"influence study: {error}") from error
    print()
    print(summary(result.results))
    print(f"\noutputs written to {result.out}/ (results.json, report.md, scores/, top_examples.jsonl)")
    return 0
