"""Where a task's data comes from, as small picklable values.

A :class:`ClientSource` names what one client reads where it runs: its own data (a file or
directory on its node), its held-out split, its placement, or -- the simulation -- its shard
of a data set shared with the other simulated clients. The driver hands it to the client
and never opens it; the client reads and validates it, so raw text never crosses Ray.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from ifedicl.kernel.data import (
    READERS,
    Columns,
    Split,
    TaskData,
    load_hf_dataset,
    load_task_dir,
    read_data_file,
    read_task_json,
    split_name,
)
from ifedicl.kernel.errors import DataError, IfediclError, TaskSpecError
from ifedicl.kernel.task import TaskSpec

KINDS = ("task_dir", "hf", "file")
DATA_ROOT = "IFEDICL_DATA_ROOT"  # on a client's node: where relative client data locations start


@dataclass(frozen=True)
class DataSource:
    location: str  # a task directory, an HF dataset name / save_to_disk path, or one data file
    kind: str = "task_dir"  # task_dir | hf | file (.jsonl, .csv or .parquet: its rows are the train split)
    task: TaskSpec | None = None  # overrides task.json / the built-in template
    max_train: int | None = None
    max_test: int | None = None
    text_field: str = "text"
    label_field: str = "label"
    split: str | None = None  # the training split (None: train); a task directory's file stem or an HF split
    test_split: str | None = None  # the held-out split (None: test, else an HF dataset's validation)

    @classmethod
    def from_options(
        cls,
        task_dir: str | Path | None,
        dataset: str | None,
        template: str | None = None,
        labels: str | None = None,
        max_train: int | None = None,
        max_test: int | None = None,
        text_field: str = "text",
        label_field: str = "label",
        split: str | None = None,
        test_split: str | None = None,
    ) -> DataSource:
        """The source the CLI's ``--task-dir``/``--dataset`` (+ ``--template``/``--labels``, ``--text-field``/
        ``--label-field``, ``--split``/``--test-split``) name."""
        if bool(task_dir) == bool(dataset):
            raise DataError("give exactly one of --task-dir or --dataset")
        spec = None
        if template or labels:
            if not (template and labels):
                raise DataError("--template and --labels go together")
            name = Path(task_dir or dataset).name.lower()
            words = tuple(w.strip() for w in labels.split(","))
            try:
                spec = TaskSpec(name, template.replace("\\n", "\n"), words)
            except TaskSpecError as err:  # say which options it came from (task.json is not involved)
                raise TaskSpecError(f"--template/--labels: {err}") from None
        if split is not None:
            split_name(split, "--split")
        if test_split is not None:
            split_name(test_split, "--test-split")
        columns = {"text_field": text_field, "label_field": label_field, "split": split, "test_split": test_split}
        if task_dir:
            return cls(str(task_dir), "task_dir", spec, max_train, max_test, **columns)
        return cls(dataset, "hf", spec, max_train, max_test, **columns)

    @classmethod
    def at(cls, path: str | Path, task: TaskSpec | None = None) -> DataSource:
        """The source a path names, by its name alone (whoever calls this may not be where the data is): a
        data file by its suffix, else a directory (a task directory, or an HF ``save_to_disk`` one: the
        client tells them apart where it reads, :meth:`ClientSource.load`)."""
        path = Path(path)
        return cls(str(path), "file" if path.suffix.lower() in READERS else "task_dir", task)

    def load(self) -> TaskData:
        columns = Columns(self.text_field, self.label_field)
        if self.kind == "task_dir":
            data = load_task_dir(self.location, self.task, columns, self.split, self.test_split)
        elif self.kind == "file":
            if self.task is None:
                raise DataError(f"{self.location}: a data file needs the task (template and labels) given with it")
            if self.split is not None or self.test_split is not None:
                raise DataError(
                    f"{self.location}: a data file is one split; split and test_split name splits of a task "
                    "directory or an HF dataset"
                )
            data = TaskData(self.task, read_data_file(self.location, self.task, columns), Split())
        else:
            data = load_hf_dataset(
                self.location, self.task, self.text_field, self.label_field, self.split, self.test_split
            )
        return TaskData(data.task, data.train.head(self.max_train), data.test.head(self.max_test))


@dataclass(frozen=True)
class ClientProfile:
    """What a client tells the server about its data when it joins: counts, never rows."""

    examples: int
    class_counts: tuple[int, ...]  # [C] training examples per class
    test_examples: int  # held-out examples it can score (0: none)

    def to_dict(self) -> dict:
        return {"examples": self.examples, "class_counts": list(self.class_counts), "test_examples": self.test_examples}


@dataclass(frozen=True)
class ClientSource:
    """One federation client: its name, the data only it reads (on the node it runs on), where it runs.

    ``train`` is read by the client itself; ``test`` is its held-out split for federated evaluation
    (a task directory's ``test`` split, or a data file whole). ``placement`` is a Ray custom resource
    (``resource:NAME`` or just ``NAME``) or node label (``label:KEY=VALUE``) that only the nodes holding
    the data have. ``indices`` makes it a shard of ``train`` (the Dirichlet simulation's partitioner).

    A relative location is resolved by the client, on its node: against that node's ``IFEDICL_DATA_ROOT``
    (where the organisation mounts its data) if set, else against ``root`` (the run config's folder).
    """

    name: str
    train: DataSource
    test: DataSource | None = None
    placement: str | None = None
    indices: tuple[int, ...] | None = None
    root: str | None = None

    def load(self, task: TaskSpec) -> TaskData:
        """This client's examples, validated against the federation's ``task``; errors name the client."""
        try:
            return self._load(task)
        except (IfediclError, OSError) as err:
            raise DataError(f"client {self.name!r}: {err}") from None

    def _load(self, task: TaskSpec) -> TaskData:
        location = self._on_this_node(self.train, task).location
        own = read_task_json(location) if self.train.kind == "task_dir" else None
        if own is not None and (own.template, own.labels) != (task.template, task.labels):
            raise DataError(
                f"{location}/task.json defines template {own.template!r} and labels {list(own.labels)}, "
                f"not the federation's {task.template!r} and {list(task.labels)}"
            )
        train = self._on_this_node(self.train, task).load().train
        if self.indices is not None:
            if self.indices and not 0 <= min(self.indices) <= max(self.indices) < len(train):
                raise DataError(f"its shard indexes past the {len(train)} examples of {self.train.location}")
            train = train.subset(self.indices)
        if not len(train):
            raise DataError(f"no training examples in {self.train.location}")
        test = Split()
        if self.test is not None:
            held_out = self._on_this_node(self.test, task).load()
            test = held_out.train if self.test.kind == "file" else held_out.test
            if not len(test):
                raise DataError(f"its held-out split {self.test.location} is empty")
        return TaskData(task, train, test)

    def _on_this_node(self, source: DataSource, task: TaskSpec) -> DataSource:
        """``source`` for ``task``, its relative location resolved where this client runs."""
        location = Path(source.location)
        base = os.environ.get(DATA_ROOT) or self.root
        if base and not location.is_absolute():
            candidate = Path(base) / location
            if source.kind != "hf" or candidate.exists():  # an HF name that is no folder names a hub dataset
                location = candidate
        kind = source.kind
        if kind == "task_dir" and (location / "dataset_dict.json").exists():  # an HF save_to_disk folder
            kind = "hf"
        return replace(source, location=str(location), kind=kind, task=task)

    def profile(self, data: TaskData) -> ClientProfile:
        counts = Counter(data.train.labels)
        return ClientProfile(
            len(data.train), tuple(counts.get(c, 0) for c in range(len(data.task.labels))), len(data.test)
        )
