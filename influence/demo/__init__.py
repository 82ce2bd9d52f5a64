"""The study in miniature (Li, Zhao, Li & Sun, arXiv 2409.19998): tiny LM + LoRA, three task
families, every attribution method, ``Acc`` / ``Cover`` / ``AUC`` against class membership,
each with two control rows (:mod:`influence.demo.controls`).

Run it with ``influence demo`` or from Python::

    from influence.demo import DemoConfig, run_demo
    results = run_demo(DemoConfig(tasks=("harmful",), methods=("identity", "repsim")))
"""

from .attribution import Attribution, evaluate
from .controls import swap_responses, untrained_model
from .data import Example
from .families import FAMILIES, TaskData, make_task
from .methods import METHODS, Method
from .pipeline import DemoConfig, TaskResult, run_demo, run_task
from .pretrain import PretrainConfig, pretrain
from .report import summary, write_report
from .tokenizer import DemoTokenizer, train_tokenizer

__all__ = [
    "Attribution",
    "DemoConfig",
    "DemoTokenizer",
    "Example",
    "FAMILIES",
    "METHODS",
    "Method",
    "PretrainConfig",
    "TaskData",
    "TaskResult",
    "evaluate",
    "make_task",
    "pretrain",
    "run_demo",
    "run_task",
    "summary",
    "swap_responses",
    "train_tokenizer",
    "untrained_model",
    "write_report",
]
