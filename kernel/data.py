"""Labelled text loading: the JSONL task layout, CSV, and Hugging Face datasets.

Every loader validates as it reads (empty text, label outside the label list, a label
of the wrong type) and names the file and line of the first bad row. Files are read
as UTF-8 (a leading byte-order mark, as Excel writes, is skipped), so texts in any
script load as they are.

A label is either a class index (an integer, or a string of digits as CSV gives it)
or one of the task's label words. Booleans and floats are refused, *including*
integral floats like ``1.0``: ``int()`` used to turn ``true`` into 1 and ``1.7`` into
1 silently, and a float label column usually means the wrong column (a score, a
regression target) or an export that turned missing values into NaN, which is worth
a look rather than a guess. Write the index as an integer (``1``) instead.
"""

from __future__ import annotations

import csv
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ifedicl.kernel.errors import DataError, TaskSpecError
from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec


@dataclass
class Split:
    """Parallel lists of texts and integer labels (indices into the task's label words)."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> Split:
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices])

    def head(self, n: int | None) -> Split:
        return self if n is None else self.subset(range(min(n, len(self))))


@dataclass
class TaskData:
    task: TaskSpec
    train: Split
    test: Split


def _label_index(label: object, task: TaskSpec, where: str) -> int:
    """The class index a row's label names, or a :class:`DataError` that quotes it."""
    words = list(task.labels)
    use = f"use an integer class index (0..{len(words) - 1}) or a word of {words}"
    if label is None:
        raise DataError(f"{where}: missing label")
    # bool before Integral: True is an int to Python, and int(True) == 1 would pass silently
    if isinstance(label, bool | np.bool_):
        raise DataError(f"{where}: label {label!r} is a boolean; {use}")
    if isinstance(label, numbers.Integral):
        index = int(label)
    elif isinstance(label, numbers.Real):
        raise DataError(f"{where}: label {label!r} is a float; {use}")
    elif isinstance(label, str):
        if label in task.labels:
            return task.labels.index(label)
        if not label.lstrip("-").isdigit():
            raise DataError(f"{where}: label {label!r} is not one of {words} nor an integer class index")
        index = int(label)
    else:
        raise DataError(f"{where}: label {label!r} is a {type(label).__name__}; {use}")
    if not 0 <= index < len(words):
        raise DataError(f"{where}: label {index} is outside 0..{len(words) - 1} ({words})")
    return index


def _check_row(
    text: object, label: object, task: TaskSpec, where: str, columns: Columns | None = None
) -> tuple[str, int]:
    """A row's (text, class index), or a :class:`DataError` naming the row (and the column, where rows have
    named ones: a wrong --text-field reads as a missing text)."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty or missing text" + (f" (field {columns.text!r})" if columns else ""))
    if label is None and columns is not None:
        raise DataError(f"{where}: missing label (field {columns.label!r})")
    return text, _label_index(label, task, where)


def _not_utf8(path: Path, err: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{path}: not UTF-8 text ({err.reason}, byte {err.object[err.start : err.end]!r}); save it as UTF-8"
    )


@dataclass(frozen=True)
class Columns:
    """Which field of a row holds the text and which the label (``--text-field``/``--label-field``)."""

    text: str = "text"
    label: str = "label"

    def __str__(self) -> str:
        return f"'{self.text}' and '{self.label}'"


def _read_jsonl(path: Path, task: TaskSpec, columns: Columns = Columns()) -> Split:
    split = Split()
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: invalid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected an object with {columns}")
                text, label = _check_row(row.get(columns.text), row.get(columns.label), task, where, columns)
                split.texts.append(text)
                split.labels.append(label)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None
    return split


def _read_csv(path: Path, task: TaskSpec, columns: Columns = Columns()) -> Split:
    split = Split()
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {columns.text, columns.label} <= set(reader.fieldnames):
                raise DataError(f"{path}: CSV needs a header with {columns} columns, got {reader.fieldnames}")
            for row in reader:
                # the reader's own line count: a quoted text may span several physical lines
                where = f"{path}:{reader.line_num}"
                text, label = _check_row(row[columns.text], row[columns.label], task, where, columns)
                split.texts.append(text)
                split.labels.append(label)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None
    return split


def _read_parquet(path: Path, task: TaskSpec, columns: Columns = Columns()) -> Split:
    import pyarrow.parquet as pq  # a LanceDB dependency, imported only on this path

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors name no file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if not {columns.text, columns.label} <= set(table.column_names):
        raise DataError(f"{path}: Parquet needs {columns} columns, got {table.column_names}")
    split = Split()
    texts, labels = table[columns.text].to_pylist(), table[columns.label].to_pylist()
    for row, (text, label) in enumerate(zip(texts, labels)):
        text, label = _check_row(text, label, task, f"{path} row {row}")
        split.texts.append(text)
        split.labels.append(label)
    return split


READERS = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


def read_data_file(path: str | Path, task: TaskSpec, columns: Columns = Columns()) -> Split:
    """One file of labelled rows (``.jsonl``, ``.csv`` or ``.parquet``), validated against ``task``."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data file type (use {', '.join(READERS)})")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return reader(path, task, columns)


def _read_split(directory: Path, name: str, task: TaskSpec, required: bool, columns: Columns) -> Split:
    for suffix, reader in READERS.items():
        path = directory / f"{name}{suffix}"
        if path.exists():
            split = reader(path, task, columns)
            if required and not split:
                raise DataError(f"{path}: no examples")
            return split
    if required:
        raise DataError(f"{directory}: no {name}.jsonl, {name}.csv or {name}.parquet")
    return Split()


def read_task_json(directory: str | Path) -> TaskSpec | None:
    """The task ``directory/task.json`` defines, or None if there is none."""
    spec_path = Path(directory) / "task.json"
    if not spec_path.exists():
        return None
    try:
        return TaskSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8-sig")))
    except json.JSONDecodeError as err:
        raise DataError(f"{spec_path}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise _not_utf8(spec_path, err) from None
    except TaskSpecError as err:  # name the file: the spec's own message cannot know where it came from
        raise TaskSpecError(f"{spec_path}: {err}") from None


def load_task_dir(directory: str | Path, task: TaskSpec | None = None, columns: Columns = Columns()) -> TaskData:
    """Load ``task.json`` + ``train``/``test`` (``.jsonl``, ``.csv`` or ``.parquet``) from a directory.

    ``task`` overrides (or replaces a missing) ``task.json``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"task directory {directory} does not exist")
    if task is None:
        task = read_task_json(directory)
        if task is None:
            raise DataError(f"{directory}: no task.json (or pass --template and --labels)")
    train = _read_split(directory, "train", task, required=True, columns=columns)
    test = _read_split(directory, "test", task, required=False, columns=columns)
    return TaskData(task, train, test)


def load_hf_dataset(
    name_or_path: str,
    task: TaskSpec | None = None,
    text_field: str = "text",
    label_field: str = "label",
) -> TaskData:
    """Load a Hugging Face dataset by hub name, or a local ``save_to_disk`` directory.

    The template and labels default to I2CL's for known names (sst2, agnews, ...).
    """
    import datasets  # optional dependency, imported only on this path

    if task is None:
        key = Path(name_or_path).name.split("/")[-1].lower()
        if key not in KNOWN_TASKS:
            raise DataError(f"dataset {name_or_path!r}: no built-in template; pass --template and --labels")
        template, labels = KNOWN_TASKS[key]
        task = TaskSpec(key.replace("ag_news", "agnews"), template, labels)
    try:
        if Path(name_or_path).exists():
            dataset = datasets.load_from_disk(name_or_path)
        else:
            dataset = datasets.load_dataset(name_or_path)
    except Exception as err:  # the hub or disk layer: report it as a data problem
        raise DataError(f"could not load dataset {name_or_path!r}: {err}") from None
    splits = {}
    for split_name in ("train", "test"):
        fallback = "validation" if split_name == "test" else None
        name = split_name if split_name in dataset else fallback
        if name is None or name not in dataset:
            if split_name == "train":
                raise DataError(f"dataset {name_or_path!r} has no train split (has {list(dataset)})")
            splits[split_name] = Split()
            continue
        part = dataset[name]
        for column in (text_field, label_field):
            if column not in part.column_names:
                raise DataError(f"dataset {name_or_path!r}[{name}] has no column {column!r} ({part.column_names})")
        split = Split()
        for i, (text, label) in enumerate(zip(part[text_field], part[label_field])):
            text, label = _check_row(text, label, task, f"{name_or_path}[{name}] row {i}")
            split.texts.append(text)
            split.labels.append(label)
        splits[split_name] = split
    return TaskData(task, splits["train"], splits["test"])
