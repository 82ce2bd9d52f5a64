"""``load_scores``: a score matrix from a ``.npy`` or ``.csv``/``.tsv`` file.

Files are untrusted input: ``.npy`` files are read with ``allow_pickle=False`` (numeric arrays
only, nothing is unpickled) and CSV cells are parsed as numbers, nothing else.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._stats import first_non_finite

AUTO = "auto"
SUFFIXES = (".npy", ".csv", ".tsv")


def load_scores(
    path: str | os.PathLike,
    sign: int = 1,
    *,
    header: bool | str = AUTO,
    index_col: bool | str = AUTO,
) -> np.ndarray:
    """Reads a ``(n_test, n_train)`` score matrix and returns it as float64, times ``sign``.

    The library's convention is larger = more helpful. Files whose convention is the opposite
    (e.g. the study's released CSVs, where a negative influence is helpful) need ``sign=-1``.
    Rows must be the queries; transpose the result (``.T``) if the file has one row per
    training example.

    CSV (``.csv``: commas; ``.tsv``: tabs) holds a numeric matrix, optionally with a header
    row and an index column (e.g. written by ``pandas.DataFrame.to_csv``). ``"auto"`` decides:

    - ``header``: the first row is a header when a non-empty cell after its first is not a number, or
      when its first cell is not a number (or empty) while the first cells of the other rows
      are numbers;
    - ``index_col``: the first column is an index when its header cell is empty, when its
      header cell is a name and every other header cell a number, or when one of its data
      cells is not a number.

    A header of numbers only (training ids) or an index of numbers under a named header cell
    cannot be told from data: pass ``header=True`` / ``index_col=True``. When ``"auto"`` keeps
    a first column that counts ``0, 1, 2, ...`` or ``1, 2, 3, ...`` as data, a ``UserWarning``
    says so.

    Args:
        path: a ``.npy``, ``.csv`` or ``.tsv`` file.
        sign: ``1`` (the file's larger = more helpful) or ``-1`` (the file's smaller = more
            helpful).
        header: ``"auto"``, ``True`` or ``False`` (CSV only).
        index_col: ``"auto"``, ``True`` or ``False`` (CSV only).

    Returns:
        ``(n_test, n_train)`` float64 array.

    Raises:
        ValueError: an unsupported suffix, ``sign`` not ±1, a non-numeric or empty cell, rows
            of different lengths, an array that is not 2-D, or NaN/inf entries.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "scores.csv"
        >>> _ = path.write_text(",train_0,train_1\\nquery_0,-0.5,0.25\\n")
        >>> load_scores(path, sign=-1)
        array([[ 0.5 , -0.25]])
    """
    if isinstance(sign, bool) or sign not in (1, -1):
        raise ValueError(
            f"load_scores: sign must be 1 (the file's larger = more helpful) or -1 (the file's "
            f"smaller = more helpful, e.g. the study's CSVs); got {sign!r}."
        )
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"load_scores: unsupported file type {path.name!r}. Supported suffixes: {SUFFIXES}.")
    if not path.is_file():
        raise FileNotFoundError(f"load_scores: no such file: {path}.")
    for name, value in (("header", header), ("index_col", index_col)):
        if value not in (AUTO, True, False):
            raise ValueError(f"load_scores: {name} must be 'auto', True or False; got {value!r}.")
    S = _read_npy(path) if suffix == ".npy" else _read_csv(path, "\t" if suffix == ".tsv" else ",", header, index_col)
    bad = first_non_finite(S)
    if bad is not None:
        count, i, j = bad
        raise ValueError(
            f"load_scores: {path.name} has {count} NaN/inf entries, the first at row {i}, "
            f"column {j} of the matrix (0-based, after any header/index). Scores must be finite."
        )
    return S * float(sign)


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(
            f"load_scores: {path.name} is not a numeric .npy array ({error}). Only numeric arrays "
            "are read; object arrays are never unpickled."
        ) from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"load_scores: {path.name} holds several arrays (an .npz archive?); save one with np.save.")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"load_scores: {path.name} holds {array.dtype} values; expected real numbers (int or float).")
    if array.ndim != 2 or array.size == 0:
        raise ValueError(
            f"load_scores: {path.name} has shape {array.shape}; expected a non-empty 2-D (n_test, n_train) "
            "matrix (one query: array[None])."
        )
    return array.astype(np.float64)


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(path: Path, delimiter: str, header: Any, index_col: Any) -> np.ndarray:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(line, [c.strip() for c in row]) for line, row in enumerate(csv.reader(f, delimiter=delimiter), 1)
                if any(c.strip() for c in row)]
    if not rows:
        raise ValueError(f"load_scores: {path.name} is empty.")
    first = rows[0][1]
    if header == AUTO:
        later_first_cells_numeric = all(_number(cells[0]) is not None for _, cells in rows[1:])
        header = any(c != "" and _number(c) is None for c in first[1:]) or (
            _number(first[0]) is None and later_first_cells_numeric
        )
    names, data = (first, rows[1:]) if header else (None, rows)
    if not data:
        raise ValueError(
            f"load_scores: {path.name} has a header row but no data rows (pass header=False if its first row is data)."
        )
    if index_col == AUTO:
        index_col = any(_number(cells[0]) is None for _, cells in data) or (names is not None and (
            names[0] == "" or (_number(names[0]) is None and all(_number(c) is not None for c in names[1:]))
        ))
        if not index_col and len(data[0][1]) > 1:
            _warn_if_counting(path, [_number(cells[0]) for _, cells in data])
    width = len(data[0][1])
    matrix = []
    for line, cells in data:
        if len(cells) != width:
            raise ValueError(
                f"load_scores: line {line} of {path.name} has {len(cells)} cells, line {data[0][0]} has "
                f"{width}: every row needs the same number of columns."
            )
        values = []
        for column, cell in enumerate(cells[1:] if index_col else cells, 2 if index_col else 1):
            value = _number(cell)
            if value is None:
                raise ValueError(
                    f"load_scores: line {line}, column {column} of {path.name} is {cell!r}, not a number"
                    + (" (empty cell)" if cell == "" else "")
                    + ". Scores must be numeric; a header row and an index column are read with header=True, "
                    "index_col=True."
                )
            values.append(value)
        matrix.append(values)
    S = np.array(matrix, dtype=np.float64)
    if S.shape[1] == 0:
        raise ValueError(f"load_scores: {path.name} has no score columns after its index column.")
    return S


def _warn_if_counting(path: Path, column: list[float | None]) -> None:
    values = np.array(column, dtype=np.float64)
    n = len(values)
    if n > 1 and (np.array_equal(values, np.arange(n)) or np.array_equal(values, np.arange(1, n + 1))):
        warnings.warn(
            f"load_scores: the first column of {path.name} counts {values[0]:g}, {values[1]:g}, ... like a row "
            "index but is read as scores; pass index_col=True to drop it or index_col=False to keep it "
            "and silence this warning.",
            UserWarning,
            stacklevel=3,
        )
