"""The two controls every table of a study carries (issue 14, item 4).

A method that finds the training examples sharing the query's *answer tokens* scores high on
class attribution without attributing anything: when each class has its own response, the
answer gives the class away. The controls measure how much of a score comes from that:

- ``before_finetuning``: the same methods on the model before fine-tuning (the base model
  with fresh LoRA adapters, ``lora_B = 0``; for the built-in TinyLM, the architecture at random
  initialisation). Whatever a method reaches there does not come from what fine-tuning taught.
- ``swapped_response``: each query's response replaced by the response of a query of another
  class (:func:`swap_responses`), scored on the fine-tuned model against the query's *own*
  label. A method that follows the answer tokens drops (towards 0); ``acc_other_class`` is its
  Acc against the class the swapped-in response came from.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .data import Record

CONTROLS = ("before_finetuning", "swapped_response")


def swap_responses(queries: Sequence[Record],
                   pool: Sequence[Record] = ()) -> tuple[list[Record], list[str]]:
    """Each query with the response of the next query (cyclically) of another class.

    When every query has the same class, the responses come from ``pool`` (e.g. the training
    split) instead. Returns the swapped queries (prompt and label kept) and, per query, the
    label of the example whose response it got.

    Examples:
        >>> q = [Record("p0", "yes", "a", 0), Record("p1", "yes", "a", 1), Record("p2", "no", "b", 2)]
        >>> swapped, donors = swap_responses(q)
        >>> [r.response for r in swapped], donors
        (['no', 'no', 'yes'], ['b', 'b', 'a'])
    """
    out, donors = [], []
    for i, query in enumerate(queries):
        donor = _donor(queries, i, query.label) or _donor(pool, i % max(len(pool), 1), query.label)
        if donor is None:
            raise ValueError(
                f"Cannot swap the response of query {query.index}: no query or training example "
                f"has a class other than {query.label!r}."
            )
        out.append(replace(query, response=donor.response))
        donors.append(donor.label)
    return out, donors


def _donor(rows: Sequence[Record], start: int, label: str) -> Record | None:
    n = len(rows)
    for step in range(1, n + 1):
        row = rows[(start + step) % n]
        if row.label != label:
            return row
    return None
