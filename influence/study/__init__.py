"""``influence study``: the study's question on your own data and model.

Li, Zhao, Li & Sun, "Do Influence Functions Work on Large Language Models?" (arXiv
2409.19998) fine-tune an LLM with LoRA on prompt/response data with classes and ask whether
each method ranks the query's class first. :func:`run_study` does the same on a folder of
``train`` and ``test`` splits and any HuggingFace causal LM (or the built-in TinyLM), with
two control rows, and writes a report folder (see ``docs/study.md``)::

    from influence.study import StudyConfig, run_study
    result = run_study(StudyConfig(data="my_data", model="my_model", out="study"))
    result.results["methods"]["repsim"]["acc"], result.scores["datainf"].shape
"""

from .config import DEFAULT_METHODS, StudyConfig
from .controls import CONTROLS, swap_responses
from .data import Record, read_split
from .lora import LoraSettings, find_targets
from .outputs import summary, write_outputs
from .run import StudyResult, run_study

__all__ = [
    "StudyConfig",
    "StudyResult",
    "run_study",
    "LoraSettings",
    "Record",
    "read_split",
    "find_targets",
    "swap_responses",
    "summary",
    "write_outputs",
    "CONTROLS",
    "DEFAULT_METHODS",
]
