"""What a study run depends on (:class:`StudyConfig`), checked before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..demo.methods import check_methods
from ..demo.pretrain import PretrainConfig
from .batches import check_loss
from .data import DEFAULT_FIELDS, parse_fields
from .lora import LoraSettings
from .models import check_dtype

DEFAULT_METHODS = ("identity", "datainf", "lissa_paper", "repsim")
"""The study's own four: gradient match, DataInf, LiSSA as in its code, RepSim."""

HF_LR, TINYLM_LR = 3e-4, 1e-2
"""Default fine-tuning learning rates: a HuggingFace model with LoRA, the built-in TinyLM."""


@dataclass
class StudyConfig:
    """Everything a study run depends on (written into ``results.json``).

    Attributes:
        data: folder with the ``train`` and ``test`` splits (see :mod:`influence.study.data`).
        model: HuggingFace causal LM (local folder or hub id); ``None``: the built-in TinyLM
            pretrained on the training split's text.
        adapter: a saved peft LoRA adapter of ``model`` to attribute as is (no fine-tuning).
        fields: names of the prompt, response and label fields.
        loss: ``"response"`` (next-token loss on the response) or ``"full"`` (the study's code:
            ``labels = input_ids`` over the padded sequence).
        methods: names from :data:`influence.demo.methods.METHODS`.
        queries: number of test examples to attribute (a seeded sample); ``None``: all.
        epochs, lr, batch_size: AdamW fine-tuning of the adapters (``lr=None``: 3e-4 for a
            HuggingFace model, 1e-2 for the TinyLM).
        lora: rank, alpha, dropout, target module names and layers of the adapters.
        max_length: tokens per example at most (longer prompts are cut at their end).
        damping_ratio: ``λ = damping_ratio · mean ‖∇ℓ‖² / P`` for the curvature methods.
        curvature_type: curvature of the curvature methods (``"fisher"``, ``"ggn"``, ...).
        controls: also compute the two control rows (see :mod:`influence.study.controls`).
        device, dtype: where and in which precision the model runs.
        seed: seeds the query sample, the adapters' initialisation and the batch order.
        pretrain: size and pretraining of the TinyLM (without ``model``).
        out: folder for the outputs (:mod:`influence.study.outputs`); ``None``: write nothing.
    """

    data: str = ""
    model: str | None = None
    adapter: str | None = None
    fields: tuple[str, str, str] = DEFAULT_FIELDS
    loss: str = "response"
    methods: tuple[str, ...] = DEFAULT_METHODS
    queries: int | None = None
    epochs: int = 3
    lr: float | None = None
    batch_size: int = 8
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_length: int = 512
    damping_ratio: float = 0.1
    curvature_type: str = "fisher"
    controls: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(steps=300))
    out: str | None = None

    def checked(self) -> "StudyConfig":
        """Validates every field (clear errors before any model is loaded); returns self."""
        if not self.data:
            raise ValueError("StudyConfig.data is empty: pass the folder with the train and test "
                             "splits (--data DIR).")
        self.fields = parse_fields(self.fields)
        self.methods = tuple(check_methods(self.methods))
        if not self.methods:
            raise ValueError("No methods given; choose from --methods "
                             "identity,datainf,lissa_paper,repsim,...")
        check_loss(self.loss)
        check_dtype(self.dtype)
        if self.adapter and not self.model:
            raise ValueError(
                "--adapter needs --model: the base model the adapter was trained on (the "
                "built-in TinyLM is pretrained afresh by every run)."
            )
        for name, value, low in (("epochs", self.epochs, 0 if self.adapter else 1),
                                 ("batch_size", self.batch_size, 1), ("max_length", self.max_length, 2),
                                 ("lora.r", self.lora.r, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
        if self.queries is not None and (not isinstance(self.queries, int) or self.queries < 1):
            raise ValueError(f"queries must be a positive integer or None (all); got {self.queries!r}.")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr!r}.")
        if not 0 <= self.lora.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1); got {self.lora.dropout!r}.")
        return self

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return HF_LR if self.model else TINYLM_LR

    def to_dict(self) -> dict:
        return asdict(self)
