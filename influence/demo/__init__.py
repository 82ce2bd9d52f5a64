"""The study in miniature (Li, Zhao, Li & Sun, arXiv 2409.19998): tiny LM + LoRA, three task
families, every attribution method, ``Acc`` / ``Cover`` / ``AUC`` against class membership.

Run it with ``influence demo`` or from Python::

    from influence.demo import DemoConfig, run_demo
    results = run_demo(DemoConfig(tasks=("harmful",), methods=("identity", "repsim")))
"""

from .families import FAMILIES, TaskData, make_task
from .methods import METHODS, Method
from .pipeline import DemoConfig, run_demo, run_task
from .pretrain import PretrainConfig, pretrain
from .report import summary, write_report

__all__ = [
    "DemoConfig",
    "FAMILIES",
    "METHODS",
    "Method",
    "PretrainConfig",
    "TaskData",
    "make_task",
    "pretrain",
    "run_demo",
    "run_task",
    "summary",
    "write_report",
]
