"""``TracIn``: learning-rate-weighted gradient dot products summed over checkpoints."""

from __future__ import annotations

from typing import Sequence

from ..params import ParamSpec
from ..tasks import Task
from ._base import GradientBaseline, as_models


class TracIn(GradientBaseline):
    """TracInCP (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient
    Descent"): ``score(z, z_j) = Σ_c η_c ∇m_c(z)ᵀ ∇ℓ_c(z_j)``, with ``∇·_c`` the gradient at
    checkpoint ``c`` and ``η_c`` the learning rate in effect there.

    Positive = helpful, as everywhere in the library: a gradient step on ``z_j`` at checkpoint
    ``c`` lowers the query's measurement by about ``η_c ∇m_cᵀ∇ℓ_c``.

    Args:
        checkpoints: models, or state dicts of the fitted model's architecture, saved during
            training (state dicts are loaded into copies of the model at ``fit``, so all
            checkpoints are held in memory).
        learning_rates: one learning rate for all checkpoints, or one per checkpoint.
        task: reads batches; default ``ClassificationTask()``.
        params: attributed parameters (names are resolved on each checkpoint).
        chunk_size: examples per vmap chunk for per-example gradients.

    Fitted attributes: ``checkpoints_`` (the models), ``learning_rates_``.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
        >>> early = {k: v + 0.1 for k, v in model.state_dict().items()}
        >>> tracin = TracIn([early, model.state_dict()], learning_rates=[0.1, 0.01])
        >>> tracin.fit(model, data).pairwise_scores(data).shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        checkpoints: Sequence,
        learning_rates: float | Sequence[float] = 1.0,
        task: Task | None = None,
        params: ParamSpec = "trainable",
        chunk_size: int | None = None,
    ):
        self.checkpoints = checkpoints
        self.learning_rates = learning_rates
        self.task = task
        self.params = params
        self.chunk_size = chunk_size

    def _fit(self, model, train_loader):
        models = as_models(model, self.checkpoints, "checkpoints")
        rates = self.learning_rates
        if isinstance(rates, (int, float)) and not isinstance(rates, bool):
            rates = [float(rates)] * len(models)
        rates = [float(r) for r in rates]
        if len(rates) != len(models):
            raise ValueError(
                f"learning_rates has {len(rates)} values for {len(models)} checkpoints: pass one "
                "learning rate per checkpoint, or a single float for all."
            )
        self.checkpoints_ = models
        self.learning_rates_ = rates

    def _features(self, batch, role):
        feats = []
        for model, rate in zip(self.checkpoints_, self.learning_rates_):
            G = self._grads(model, batch, role)
            feats.append(G * rate if role != "train" else G)
        return feats
