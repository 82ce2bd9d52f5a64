"""The two controls that tell whether a class-attribution score measures attribution.

Class metrics (``Acc``, ``Cover``, ``AUC``) reward a method for ranking training examples of
the query's class first. On data whose class fixes the answer (the sentiment name, the rule
name, the compliance text), a method can do that without looking at what the model learned:
the loss gradient of a response is dominated by its answer tokens, so plain gradient matching
finds the training examples with the same answer words, even on a model that has learned
nothing. Two controls, computed by the same methods, expose it:

- **before fine-tuning** (:func:`untrained_model`): the same attribution on the model before
  fine-tuning, its adapters at their initialisation. ``init="random"`` (the demo's choice for
  the TinyLM) starts from freshly initialised weights: a model that knows nothing, so any Acc
  it gets comes from the data's surface (shared answer tokens), not from learning.
  ``init="base"`` starts from the pretrained base model (the study's "before fine-tuning" for
  a real LLM): the exact starting point of fine-tuning.
- **swapped responses** (:func:`swap_responses`): each query keeps its prompt and its class
  label, but its response is replaced by the response of a training example of another class.
  A method that follows the prompt keeps its Acc; one that follows the answer tokens falls
  toward 0 (it now finds the other class), which :func:`run_controls` also reports as
  ``acc_response``: how often the top-1 example has the class of the swapped-in response.

A method's Acc on the fine-tuned model says something about attribution only where it is
clearly above its before-fine-tuning row and does not collapse on the swapped row.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any, Callable, Sequence

import torch

from .. import evaluation
from .attribution import Attribution, evaluate, evaluate_queries
from .data import Example

CONTROL_INITS = ("random", "base")
"""How :func:`untrained_model` builds the model before fine-tuning."""


def swap_responses(queries: Sequence[Example], pool: Sequence[Example], seed: int = 0) -> list[Example]:
    """The queries with each response replaced by that of a ``pool`` example of another class.

    For each query (in order) a class other than the query's is drawn uniformly among the
    classes present in ``pool``, then an example of that class whose response differs from the
    query's (any example of the class if none differs). The swapped query keeps its prompt and
    ``label`` (the class the prompt belongs to); ``meta`` gains ``response_label`` (the swapped-in
    class), ``original_response`` and ``response_from`` (the pool index).

    Args:
        queries: the queries to swap.
        pool: where the responses come from (the demo uses the training set).
        seed: seed of the draws; the same seed gives the same swaps.

    Raises:
        ValueError: when a query's class is the only class in ``pool``.

    Examples:
        >>> pool = [Example("p1", "joy", "joy"), Example("p2", "anger", "anger")]
        >>> swapped = swap_responses([Example("she smiled", "joy", "joy")], pool)
        >>> swapped[0].prompt, swapped[0].response, swapped[0].label, swapped[0].meta["response_label"]
        ('she smiled', 'anger', 'joy', 'anger')
    """
    out = []
    for q, j in zip(queries, draw_donors(queries, pool, seed)):
        meta = {**q.meta, "response_label": pool[j].label, "original_response": q.response,
                "response_from": j}
        out.append(Example(q.prompt, pool[j].response, q.label, meta=meta))
    return out


def draw_donors(queries: Sequence[Any], pool: Sequence[Any], seed: int = 0) -> list[int]:
    """Per query, the ``pool`` index whose response :func:`swap_responses` swaps in.

    Works on any rows with ``label`` and ``response`` attributes (the demo's examples, the
    study's records): a class other than the query's drawn uniformly among the pool's classes,
    then an example of it whose response differs from the query's (any, if none differs).

    Raises:
        ValueError: when a query's class is the only class in ``pool``.
    """
    by_class: dict[Any, list[int]] = {}
    for j, ex in enumerate(pool):
        by_class.setdefault(ex.label, []).append(j)
    classes = sorted(by_class, key=repr)  # a fixed order whatever the label type
    rng = random.Random(seed)
    donors = []
    for i, q in enumerate(queries):
        others = [c for c in classes if c != q.label]
        if not others:
            raise ValueError(
                f"Query {i} has class {q.label!r}, the only class in the pool "
                f"({len(pool)} examples); swapping needs examples of another class. Pass a pool "
                "with at least two classes (e.g. the training set)."
            )
        members = by_class[rng.choice(others)]
        differing = [j for j in members if pool[j].response != q.response] or members
        donors.append(rng.choice(differing))
    return donors


def untrained_model(
    base_model: torch.nn.Module,
    add_adapters: Callable[[torch.nn.Module], torch.nn.Module],
    init: str = "random",
    seed: int = 0,
) -> torch.nn.Module:
    """The model before fine-tuning: a copy of ``base_model`` (``init="base"``) or a freshly
    initialised model of the same architecture (``init="random"``), with adapters at their
    initialisation, in eval mode. ``base_model`` is not modified.

    The adapters are added right after ``torch.manual_seed(seed)``; with the seed a fine-tuning
    run used before adding its adapters, ``init="base"`` reproduces that run's starting point
    exactly. ``init="random"`` builds ``type(base_model)(base_model.config)`` after
    ``torch.manual_seed(seed)`` (a :class:`~influence.lm.TinyLM` or a HuggingFace
    ``PreTrainedModel``), on the base model's device and dtype.

    Raises:
        ValueError: on an unknown ``init``, or ``init="random"`` for a model without a
            ``config`` its class can be built from.
    """
    if init not in CONTROL_INITS:
        raise ValueError(f"Invalid init {init!r}. Supported: {CONTROL_INITS}.")
    if init == "base":
        model = copy.deepcopy(base_model)
    else:
        config = getattr(base_model, "config", None)
        if config is None:
            raise ValueError(
                f"init='random' rebuilds the model as type(model)(model.config), but "
                f"{type(base_model).__name__} has no .config. Use init='base', or pass a model "
                "class built from a config (TinyLM, a HuggingFace PreTrainedModel)."
            )
        first = next(base_model.parameters())
        torch.manual_seed(seed)
        model = type(base_model)(config).to(device=first.device, dtype=first.dtype)
    torch.manual_seed(seed)
    return add_adapters(model).eval()


def run_controls(
    finetuned: Attribution,
    before: Attribution | None,
    swapped_batches: Sequence[Any] | None,
    swapped: Sequence[Example],
    names: Sequence[str],
    train_labels: Sequence,
    test_labels: Sequence,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Both controls for the methods ``names`` (each already fitted on ``finetuned`` by
    :func:`~influence.demo.attribution.evaluate`).

    Args:
        finetuned: the attribution of the fine-tuned model (its fitted methods score the
            swapped queries, no refit).
        before: an :class:`Attribution` of :func:`untrained_model` on the same batches, or
            ``None`` to skip that control.
        swapped_batches: the batches of ``swapped`` (``None`` to skip that control).
        swapped: :func:`swap_responses` of the queries (their ``meta["response_label"]``).
        names: the methods.
        train_labels, test_labels: classes of the training examples and of the queries'
            prompts.

    Returns:
        ``(results, scores)``: ``results[control] = {"methods": {method: metrics}, "seconds"}``
        and ``scores[control] = {method: (n_test, n_train)}`` for ``control`` in
        ``"before_finetuning"``, ``"swapped_responses"``; swapped metrics add ``acc_response``.
    """
    results, scores = {}, {}
    if before is not None:
        start = time.perf_counter()
        out, scores["before_finetuning"] = evaluate(before, names, train_labels, test_labels, log)
        results["before_finetuning"] = {"methods": out, "seconds": time.perf_counter() - start}
    if swapped_batches is not None:
        start = time.perf_counter()
        out, S = evaluate_queries(finetuned, names, swapped_batches, train_labels, test_labels, log)
        response_labels = [ex.meta["response_label"] for ex in swapped]
        for name, matrix in S.items():
            out[name]["acc_response"] = evaluation.top1_accuracy(matrix, train_labels, response_labels)
        scores["swapped_responses"] = S
        results["swapped_responses"] = {"methods": out, "seconds": time.perf_counter() - start}
    return results, scores
