"""The two controls every table of a study carries (issue 14, item 4).

A method that finds the training examples sharing the query's *answer tokens* scores high on
class attribution without attributing anything: when each class has its own response, the
answer gives the class away. The controls measure how much of a score comes from that:

- ``before_finetuning``: the same methods on the model before fine-tuning (the base model
  with fresh LoRA adapters, ``lora_B = 0``; for the built-in TinyLM, the architecture at random
  initialisation). Whatever a method reaches there does not come from what fine-tuning taught.
- ``swapped_response``: each query's response replaced by the response of a training example
  of another class (:func:`swap_responses`, seeded), scored on the fine-tuned model against the query's *own*
  label. A method that follows the answer tokens drops (towards 0); ``acc_other_class`` is its
  Acc against the class the swapped-in response came from.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ..demo.controls import draw_donors
from .data import Record

CONTROLS = ("before_finetuning", "swapped_response")


def swap_responses(queries: Sequence[Record], pool: Sequence[Record],
                   seed: int = 0) -> tuple[list[Record], list[str]]:
    """Each query with the response of a ``pool`` example of another class.

    The donors are drawn as the demo draws them (:func:`influence.demo.controls.draw_donors`:
    a class other than the query's uniformly among the pool's classes, then an example of it
    whose response differs, seeded). Returns the swapped queries (prompt and label kept) and,
    per query, the label of the example whose response it got.

    Examples:
        >>> q = [Record("p0", "yes", "a", 0), Record("p1", "no", "b", 1)]
        >>> swapped, donors = swap_responses(q, pool=q)
        >>> [r.response for r in swapped], donors
        (['no', 'yes'], ['b', 'a'])
    """
    donors = draw_donors(queries, pool, seed)
    return ([replace(q, response=pool[j].response) for q, j in zip(queries, donors)],
            [pool[j].label for j in donors])
