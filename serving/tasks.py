"""Task routing: which (task, version) is live, and which engine table row it occupies.

The engine holds ``max_slots`` table rows. A published run is written into a
*free* row and only then made live, so requests already running keep the row
(and the version) they started with: a request is leased its task version for
its whole life and scored entirely under it. A replaced version is retired; its
row returns to the free pool once its last lease ends. Everything here runs on
the server's event loop, so it needs no locks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from federation_job.task import TaskSpec


@dataclass(frozen=True)
class TaskQuality:
    """The accuracy a served version is known to have, and in which dtype.

    ``run_accuracy`` is what the run reported (held-out split, ``run_dtype``);
    ``serving_accuracy`` is the same split scored through this server's engine in
    ``serving_dtype`` (equal to the run's when the dtypes match; ``None`` when it could
    not be scored, ``note`` says why).
    """

    run_dtype: str
    serving_dtype: str
    run_accuracy: float | None
    serving_accuracy: float | None
    examples: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "dtype": self.serving_dtype,
            "run_dtype": self.run_dtype,
            "run_accuracy": self.run_accuracy,
            "serving_accuracy": self.serving_accuracy,
            "accuracy_examples": self.examples,
            "accuracy_note": self.note,
        }


class NoFreeSlotError(RuntimeError):
    """Every engine table row is live or still leased by in-flight requests."""


@dataclass
class ActiveTask:
    """One servable version of a task: its spec, run, table row and label token ids."""

    spec: TaskSpec
    run_id: str
    slot: int
    label_ids: list[int]
    created_at: datetime
    round: int
    quality: TaskQuality | None = field(default=None, compare=False)
    vectors: np.ndarray | None = field(default=None, compare=False, repr=False)  # [L, 2, d]: routing signature
    leases: int = field(default=0, compare=False)
    retired: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cache_salt(self) -> str:
        """Prefix-cache salt: KV computed under one (task, version) never serves another."""
        return f"ifedicl/{self.spec.name}/{self.run_id}"


class TaskTable:
    """Live versions by task name, plus the free/retired engine rows."""

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.live: dict[str, ActiveTask] = {}
        self._free = list(range(max_slots, 0, -1))  # pop() hands out 1, 2, ...
        self._retired: list[ActiveTask] = []

    def get(self, name: str) -> ActiveTask | None:
        return self.live.get(name)

    def names(self) -> list[str]:
        return sorted(self.live)

    def reserve_slot(self) -> int:
        """A row no live or in-flight version uses (raises :class:`NoFreeSlotError`)."""
        self._collect()
        if not self._free:
            raise NoFreeSlotError(
                f"all {self.max_slots} injection slots are in use ({len(self.live)} live tasks, "
                f"{len(self._retired)} retired versions still in flight); raise --max-slots"
            )
        return self._free.pop()

    def release_slot(self, slot: int) -> None:
        """Give back a reserved row that was never activated (a failed load)."""
        self._free.append(slot)

    def activate(self, task: ActiveTask) -> ActiveTask | None:
        """Make ``task`` the live version of its name; return the version it replaced."""
        old = self.live.get(task.name)
        self.live[task.name] = task
        if old is not None:
            self._retire(old)
        return old

    def remove(self, name: str) -> ActiveTask | None:
        old = self.live.pop(name, None)
        if old is not None:
            self._retire(old)
        return old

    def _retire(self, task: ActiveTask) -> None:
        task.retired = True
        self._retired.append(task)
        self._collect()

    def _collect(self) -> None:
        """Free the rows of retired versions that no request holds any more."""
        still = []
        for task in self._retired:
            if task.leases == 0:
                self._free.append(task.slot)
            else:
                still.append(task)
        self._retired = still

    @contextmanager
    def lease(self, task: ActiveTask) -> Iterator[ActiveTask]:
        """Hold ``task``'s row for the duration of one request."""
        task.leases += 1
        try:
            yield task
        finally:
            task.leases -= 1
            if task.retired and task.leases == 0:
                self._collect()

    def in_use_slots(self) -> set[int]:
        return {t.slot for t in self.live.values()} | {t.slot for t in self._retired}
