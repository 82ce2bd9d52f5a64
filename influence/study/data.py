"""The study's input: a folder with ``train`` and ``test`` splits of prompt/response/label rows.

Each split is one of (checked in this order; more than one is an error):

- ``DIR/<split>/``: a folder written by HuggingFace ``datasets``' ``save_to_disk`` (Arrow),
  read with ``datasets.load_from_disk`` (the optional extra ``influence-estimation[study]``);
  a ``DatasetDict.save_to_disk(DIR)`` folder has exactly this layout;
- ``DIR/<split>.jsonl``: one JSON object per line;
- ``DIR/<split>.csv``: a header row, then one row per example.

Every row needs a prompt, a response and a label (field names default to ``prompt``,
``response``, ``label``; the study's own files use ``prompts,response,variation``). Labels
may be strings or numbers and are compared as text (``1`` in a jsonl file equals ``"1"`` in
a csv file); an Arrow ``ClassLabel`` column gives its class names.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

SPLITS = ("train", "test")
DEFAULT_FIELDS = ("prompt", "response", "label")
STUDY_EXTRA = 'pip install "influence-estimation[study]"'


@dataclass(frozen=True)
class Record:
    """One prompt → response example with its class (the ground truth of attribution).

    Attributes:
        prompt: the input text.
        response: the text the model is fine-tuned to produce.
        label: the class, as text.
        index: the row's position in its split file.
    """

    prompt: str
    response: str
    label: str
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "response": self.response,
                "label": self.label}


def parse_fields(fields: str | Sequence[str]) -> tuple[str, str, str]:
    """``"prompts,response,variation"`` (or a 3-sequence) → the three field names.

    Examples:
        >>> parse_fields("prompts,response,variation")
        ('prompts', 'response', 'variation')
    """
    names = [f.strip() for f in fields.split(",")] if isinstance(fields, str) else list(fields)
    if len(names) != 3 or not all(names):
        raise ValueError(
            f"fields must name three columns PROMPT,RESPONSE,LABEL (e.g. 'prompt,response,label'); "
            f"got {fields!r}."
        )
    return tuple(names)  # type: ignore[return-value]


def split_source(data_dir: str | Path, split: str) -> Path:
    """The file or folder holding ``split`` in ``data_dir`` (see the module docstring)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"--data {str(data_dir)!r} is not a folder. Expected a folder with the splits "
            f"{SPLITS} as save_to_disk folders, .jsonl or .csv files (e.g. DIR/train.jsonl)."
        )
    found = [p for p in (data_dir / split, data_dir / f"{split}.jsonl", data_dir / f"{split}.csv")
             if p.exists()]
    if not found:
        present = sorted(p.name for p in data_dir.iterdir())[:20]
        raise FileNotFoundError(
            f"No {split!r} split in {str(data_dir)!r}: expected {split}/ (a datasets "
            f"save_to_disk folder), {split}.jsonl or {split}.csv. The folder holds {present}."
        )
    if len(found) > 1:
        raise ValueError(
            f"The {split!r} split of {str(data_dir)!r} is ambiguous: found "
            f"{[p.name for p in found]}. Keep exactly one of them."
        )
    return found[0]


def _arrow_rows(path: Path) -> tuple[list[dict], dict[str, list[str]]]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"Reading the Arrow split {str(path)!r} (a save_to_disk folder) needs the optional "
            f"dependency 'datasets', which is not installed. Install it with {STUDY_EXTRA}, or "
            "export the split as .jsonl or .csv."
        ) from error
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"{str(path)!r} holds a DatasetDict with splits {list(dataset)}, not one split. "
            "Pass the folder above it as --data, or save each split as DIR/train and DIR/test."
        )
    class_names = {name: feature.names for name, feature in dataset.features.items()
                   if isinstance(feature, datasets.ClassLabel)}
    return list(dataset), class_names


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{str(path)!r} line {line_no} is not valid JSON: {error}.") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{str(path)!r} line {line_no} is a JSON {type(row).__name__}; expected one "
                    "object per line, e.g. {\"prompt\": ..., \"response\": ..., \"label\": ...}."
                )
            rows.append(row)
    return rows


def _csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drops a BOM
        return list(csv.DictReader(f))


def _text(value: Any, what: str, where: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError(f"{where}: the {what} is empty (null). Every row needs a {what}.")
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}: the {what} is a {type(value).__name__}; expected text.")
    return str(value)


def read_split(data_dir: str | Path, split: str,
               fields: Sequence[str] = DEFAULT_FIELDS) -> list[Record]:
    """The rows of one split as :class:`Record`\\ s, in file order.

    Raises:
        FileNotFoundError: the folder or the split is missing.
        ValueError: the split is empty, a field is missing, or a response is empty.
        ImportError: an Arrow split without the ``datasets`` package.
    """
    prompt_field, response_field, label_field = parse_fields(fields)
    source = split_source(data_dir, split)
    class_names: dict[str, list[str]] = {}
    if source.is_dir():
        rows, class_names = _arrow_rows(source)
    elif source.suffix == ".jsonl":
        rows = _jsonl_rows(source)
    else:
        rows = _csv_rows(source)
    if not rows:
        raise ValueError(f"The {split!r} split ({str(source)!r}) has no rows.")
    for i, row in enumerate(rows):
        missing = [f for f in (prompt_field, response_field, label_field) if f not in row]
        if missing:
            raise ValueError(
                f"{str(source)!r} row {i} has no field(s) {missing}; its fields are "
                f"{sorted(row)}. Map the names with --fields PROMPT,RESPONSE,LABEL (now "
                f"{prompt_field},{response_field},{label_field})."
            )
    records = []
    names = class_names.get(label_field)
    for i, row in enumerate(rows):
        where = f"{str(source)!r} row {i}"
        label = row[label_field]
        if names is not None and label is not None:
            label = names[int(label)]
        record = Record(_text(row[prompt_field], "prompt", where),
                        _text(row[response_field], "response", where),
                        _text(label, "label", where), i)
        if not record.response.strip():
            raise ValueError(f"{where}: the response is empty; the fine-tuning loss needs one.")
        records.append(record)
    return records


def check_classes(train: Sequence[Record], test: Sequence[Record]) -> list[str]:
    """The sorted class names; checks that attribution by class is defined for every query.

    Raises:
        ValueError: fewer than two training classes, or a query class without training examples.
    """
    classes = sorted({r.label for r in train})
    if len(classes) < 2:
        raise ValueError(
            f"The training split has {len(classes)} class(es) ({classes}); Acc, Cover and AUC "
            "measure whether a method ranks the query's class first, which needs at least two."
        )
    orphans = sorted({r.label for r in test} - set(classes))
    if orphans:
        raise ValueError(
            f"Query label(s) {orphans[:10]} have no training examples (training labels: "
            f"{classes[:10]}). Every test label must occur in the training split."
        )
    return classes
