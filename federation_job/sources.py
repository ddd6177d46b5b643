"""Where a task's data comes from, as a small picklable value.

The driver hands a client actor a ``DataSource`` and the indices of its shard;
the actor reads the data itself, so raw text is never sent over Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from federation_job.data import TaskData, load_hf_dataset, load_task_dir
from federation_job.task import TaskSpec


@dataclass(frozen=True)
class DataSource:
    location: str  # a task directory, or an HF dataset name / save_to_disk path
    kind: str = "task_dir"  # task_dir | hf
    task: TaskSpec | None = None  # overrides task.json / the built-in template
    max_train: int | None = None
    max_test: int | None = None
    text_field: str = "text"
    label_field: str = "label"

    def load(self) -> TaskData:
        if self.kind == "task_dir":
            data = load_task_dir(self.location, self.task)
        else:
            data = load_hf_dataset(self.location, self.task, self.text_field, self.label_field)
        return TaskData(data.task, data.train.head(self.max_train), data.test.head(self.max_test))
