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

An integer label ``i`` is the task's ``i``-th label word, in every reader (one function,
:func:`_label_index`, owns the mapping), so a hub dataset whose label column holds 0/1 (SST-2)
loads as it is. ``-1`` is how the hub marks an unlabelled row (the GLUE test splits): such a
row is an error saying the split is unlabelled, never a silently wrong accuracy; pick a
labelled split instead (``--test-split validation``). Any other index outside ``0..C-1`` is
an error naming the row.

Which split is the training data and which the held-out test (``--split``/``--test-split``):
a split of an HF dataset dict, or a task directory's file stem (``dev`` reads ``dev.jsonl``,
``dev.csv`` or ``dev.parquet``). By default ``train`` and ``test`` (an HF dataset without a
``test`` split: its ``validation``, a task directory without one: no test). A split named
but absent is an error listing the splits there.
"""

from __future__ import annotations

import csv
import json
import numbers
from collections.abc import Iterable, Iterator
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


UNLABELLED = -1  # the hub's label for a row without one


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
    if index == UNLABELLED:
        raise DataError(
            f"{where}: label -1 is outside 0..{len(words) - 1}: -1 marks an unlabelled row (as in the hub's GLUE "
            "test splits), so this split is unlabelled and can be neither trained nor scored on; choose a labelled "
            "one (--test-split validation)"
        )
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


def _collect(rows: Iterable[tuple[str, object, object]], task: TaskSpec, columns: Columns) -> Split:
    """Every reader's rows, ``(where, text, label)``, checked and mapped to class indices by the same rules."""
    split = Split()
    for where, text, label in rows:
        text, index = _check_row(text, label, task, where, columns)
        split.texts.append(text)
        split.labels.append(index)
    return split


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


def _jsonl_rows(path: Path, columns: Columns) -> Iterator[tuple[str, object, object]]:
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
            yield where, row.get(columns.text), row.get(columns.label)


def _read_jsonl(path: Path, task: TaskSpec, columns: Columns = Columns()) -> Split:
    try:
        return _collect(_jsonl_rows(path, columns), task, columns)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _csv_rows(path: Path, columns: Columns) -> Iterator[tuple[str, object, object]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {columns.text, columns.label} <= set(reader.fieldnames):
            raise DataError(f"{path}: CSV needs a header with {columns} columns, got {reader.fieldnames}")
        for row in reader:
            # the reader's own line count: a quoted text may span several physical lines
            yield f"{path}:{reader.line_num}", row[columns.text], row[columns.label]


def _read_csv(path: Path, task: TaskSpec, columns: Columns = Columns()) -> Split:
    try:
        return _collect(_csv_rows(path, columns), task, columns)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _read_parquet(path: Path, task: TaskSpec, columns: Columns = Columns()) -> Split:
    import pyarrow.parquet as pq  # a LanceDB dependency, imported only on this path

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors name no file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if not {columns.text, columns.label} <= set(table.column_names):
        raise DataError(f"{path}: Parquet needs {columns} columns, got {table.column_names}")
    texts, labels = table[columns.text].to_pylist(), table[columns.label].to_pylist()
    rows = ((f"{path} row {row}", text, label) for row, (text, label) in enumerate(zip(texts, labels)))
    return _collect(rows, task, columns)


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


TRAIN, TEST, VALIDATION = "train", "test", "validation"  # the default splits


def split_name(name: str, flag: str) -> str:
    """A split's name as the user gave it, or a :class:`DataError` naming ``flag`` (a name, not a path)."""
    if not isinstance(name, str) or not name.strip() or name != name.strip() or any(c in name for c in "/\\"):
        raise DataError(f"{flag}: {name!r} is not a split name (a task directory's file stem or an HF split)")
    return name


def task_dir_splits(directory: Path) -> list[str]:
    """The splits a task directory holds: the stems of its data files."""
    return sorted({p.stem for p in directory.iterdir() if p.is_file() and p.suffix.lower() in READERS})


def _read_split(
    directory: Path, name: str, task: TaskSpec, required: bool, columns: Columns, flag: str | None
) -> Split:
    """The split ``name`` of a task directory; ``flag`` names the option that chose it (None: the default)."""
    for suffix, reader in READERS.items():
        path = directory / f"{name}{suffix}"
        if path.exists():
            split = reader(path, task, columns)
            if required and not split:
                raise DataError(f"{path}: no examples")
            return split
    if required:
        missing = f"{directory} has no split {name!r} (no {name}.jsonl, {name}.csv or {name}.parquet)"
        splits = f"its splits: {task_dir_splits(directory)}"
        raise DataError(f"{flag}: {missing}; {splits}" if flag else f"{missing}; {splits} (choose one with --split)")
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


def load_task_dir(
    directory: str | Path,
    task: TaskSpec | None = None,
    columns: Columns = Columns(),
    split: str | None = None,
    test_split: str | None = None,
) -> TaskData:
    """Load ``task.json`` + the ``split`` (default ``train``) and ``test_split`` (default ``test``, optional)
    files (``.jsonl``, ``.csv`` or ``.parquet``) of a directory.

    ``task`` overrides (or replaces a missing) ``task.json``. A split named explicitly must exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"task directory {directory} does not exist")
    train_name = split_name(split, "--split") if split is not None else TRAIN
    test_name = split_name(test_split, "--test-split") if test_split is not None else TEST
    if task is None:
        task = read_task_json(directory)
        if task is None:
            raise DataError(f"{directory}: no task.json (or pass --template and --labels)")
    chosen = "--split" if split is not None else None
    train = _read_split(directory, train_name, task, required=True, columns=columns, flag=chosen)
    test = _read_split(directory, test_name, task, required=test_split is not None, columns=columns,
                       flag="--test-split")  # fmt: skip
    return TaskData(task, train, test)


def load_hf_dataset(
    name_or_path: str,
    task: TaskSpec | None = None,
    text_field: str = "text",
    label_field: str = "label",
    split: str | None = None,
    test_split: str | None = None,
) -> TaskData:
    """Load a Hugging Face dataset by hub name, or a local ``save_to_disk`` directory (a dataset dict, or
    one dataset: its rows are the training split).

    The training split is ``split`` (default ``train``), the held-out one ``test_split`` (default ``test``,
    else ``validation``, else none); a split named explicitly must exist. The template and labels default
    to I2CL's for known names (sst2, agnews, ...).
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
    columns = Columns(text_field, label_field)
    if isinstance(dataset, datasets.Dataset):  # one saved dataset: no splits to choose from
        if split is not None or test_split is not None:
            flag = "--split" if split is not None else "--test-split"
            raise DataError(f"{flag}: dataset {name_or_path!r} is one dataset, not a dataset dict: it has no splits")
        return TaskData(task, _hf_split(name_or_path, "all", dataset, task, columns), Split())
    available = list(dataset)

    def chosen(name: str, flag: str):
        if split_name(name, flag) not in dataset:
            raise DataError(f"{flag}: dataset {name_or_path!r} has no split {name!r}; its splits: {available}")
        return dataset[name]

    train_name = split or TRAIN
    if split is None and TRAIN not in dataset:
        raise DataError(f"dataset {name_or_path!r} has no train split (its splits: {available}); pass --split")
    train = _hf_split(name_or_path, train_name, chosen(train_name, "--split"), task, columns)
    if test_split is None:
        test_split = next((name for name in (TEST, VALIDATION) if name in dataset), None)
        if test_split is None:
            return TaskData(task, train, Split())
    test = _hf_split(name_or_path, test_split, chosen(test_split, "--test-split"), task, columns)
    return TaskData(task, train, test)


def _hf_split(name_or_path: str, name: str, part, task: TaskSpec, columns: Columns) -> Split:
    for column in (columns.text, columns.label):
        if column not in part.column_names:
            raise DataError(f"dataset {name_or_path!r}[{name}] has no column {column!r} ({part.column_names})")
    texts, labels = part[columns.text], part[columns.label]
    rows = ((f"{name_or_path}[{name}] row {i}", text, label) for i, (text, label) in enumerate(zip(texts, labels)))
    return _collect(rows, task, columns)
