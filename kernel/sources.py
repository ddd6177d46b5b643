"""Where a task's data comes from, as a small picklable value.

The driver hands a client actor a ``DataSource`` and the indices of its shard;
the actor reads the data itself, so raw text is never sent over Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ifedicl.kernel.data import TaskData, load_hf_dataset, load_task_dir
from ifedicl.kernel.errors import DataError, TaskSpecError
from ifedicl.kernel.task import TaskSpec


@dataclass(frozen=True)
class DataSource:
    location: str  # a task directory, or an HF dataset name / save_to_disk path
    kind: str = "task_dir"  # task_dir | hf
    task: TaskSpec | None = None  # overrides task.json / the built-in template
    max_train: int | None = None
    max_test: int | None = None
    text_field: str = "text"
    label_field: str = "label"

    @classmethod
    def from_options(
        cls,
        task_dir: str | Path | None,
        dataset: str | None,
        template: str | None = None,
        labels: str | None = None,
        max_train: int | None = None,
        max_test: int | None = None,
    ) -> DataSource:
        """The source the CLI's ``--task-dir``/``--dataset`` (+ ``--template``/``--labels``) name."""
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
        if task_dir:
            return cls(str(task_dir), "task_dir", spec, max_train, max_test)
        return cls(dataset, "hf", spec, max_train, max_test)

    def load(self) -> TaskData:
        if self.kind == "task_dir":
            data = load_task_dir(self.location, self.task)
        else:
            data = load_hf_dataset(self.location, self.task, self.text_field, self.label_field)
        return TaskData(data.task, data.train.head(self.max_train), data.test.head(self.max_test))
