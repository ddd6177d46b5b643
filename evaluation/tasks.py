"""A task as every method sees it: the same train slice, split, and balanced test sample.

The federation reads its data through a :class:`DataSource` inside each actor; the
in-process methods load through the same source and use the same
:func:`dirichlet_partition` call, so "the same Dirichlet split" holds by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ifedicl.federation_job.partition import dirichlet_partition
from ifedicl.kernel.data import Split, TaskData, task_dir_splits
from ifedicl.kernel.errors import DataError
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import TaskSpec


def source_for(location: str, max_train: int | None, data: dict | None = None) -> DataSource:
    """A task directory (``task.json`` + data files) or an HF dataset (hub name or ``save_to_disk`` dir);
    ``data``: how to read it (DataSource's text_field, label_field, split, test_split)."""
    path = Path(location)
    read = {"max_train": max_train, **(data or {})}
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return DataSource(str(path), "hf", **read)
        if (path / "task.json").exists() or task_dir_splits(path):
            return DataSource(str(path), "task_dir", **read)
        raise DataError(f"{location}: neither a task directory (task.json, data files) nor a save_to_disk dataset")
    return DataSource(location, "hf", **read)


def balanced_sample(split: Split, size: int, num_classes: int, seed: int) -> Split:
    """Up to ``size`` examples drawn uniformly across classes, as I2CL samples its test set.

    Each class gets ``size // C`` (the remainder to the first classes); a class with
    too few examples gives all it has and the rest is filled from the other classes.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)]
    quota = [size // num_classes + (1 if c < size % num_classes else 0) for c in range(num_classes)]
    chosen: list[int] = []
    for c in range(num_classes):
        take = min(quota[c], len(pools[c]))
        chosen += pools[c][:take]
        pools[c] = pools[c][take:]
    leftovers = [i for pool in pools for i in pool]
    rng.shuffle(leftovers)
    chosen += leftovers[: max(0, size - len(chosen))]
    chosen = [int(i) for i in rng.permutation(chosen)]
    return split.subset(chosen)


@dataclass
class PreparedTask:
    location: str
    source: DataSource  # what the federation's actors load (train only; test is ours)
    data: TaskData
    test: Split

    @property
    def spec(self) -> TaskSpec:
        return self.data.task

    @property
    def name(self) -> str:
        return self.data.task.name

    def shards(self, clients: int, alpha: float, seed: int, min_shard: int) -> list[Split]:
        """The clients' private data: the exact split the Ray federation makes for the same seed."""
        indices = dirichlet_partition(self.data.train.labels, clients, alpha, seed, min_shard)
        return [self.data.train.subset(ix) for ix in indices]


def prepare_task(
    location: str, max_train: int | None, test_size: int, test_seed: int, data: dict | None = None
) -> PreparedTask:
    source = source_for(location, max_train, data)
    data = source.load()
    if not len(data.test):
        raise DataError(f"{location}: no test (or validation) split to evaluate on")
    test = balanced_sample(data.test, test_size, len(data.task.labels), test_seed)
    return PreparedTask(location, replace(source, max_test=0), data, test)
