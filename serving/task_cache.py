"""Which (task, version) each engine table row holds: a bounded cache over the published runs.

The engine holds ``max_slots`` task rows ("slots" = task rows, ``--max-slots``); the
store may publish many more tasks.
A version is written into a free row (or the row of the least recently used
version no request holds) and only then made resident, so requests already
running keep the row (and the version) they started with: a request is leased
its task version for its whole life and scored entirely under it. A replaced
version is retired; its row returns to the free pool once its last lease ends.
Everything here runs on the server's event loop, so it needs no locks.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from ifedicl.kernel.task import TaskSpec


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


class NoFreeRowError(RuntimeError):
    """Every engine task row holds a version that in-flight requests are using."""


@dataclass
class ActiveTask:
    """One resident version of a task: its spec, run, task row and label token ids."""

    spec: TaskSpec
    run_id: str
    task_row: int  # its row in the engine's injection tables, 1..max_slots
    label_ids: list[int]
    created_at: datetime
    round: int
    quality: TaskQuality | None = field(default=None, compare=False)
    leases: int = field(default=0, compare=False)
    retired: bool = field(default=False, compare=False)  # no longer the version new requests get
    released: bool = field(default=False, compare=False)  # its row went back to the pool: never score on it
    measuring: asyncio.Future | None = field(default=None, compare=False, repr=False)  # accuracy being measured

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cache_salt(self) -> str:
        """Prefix-cache salt: KV computed under one (task, version) never serves another."""
        return f"ifedicl/{self.spec.name}/{self.run_id}"


class TaskTable:
    """The engine's table rows as a bounded cache of task versions, least recently used first out.

    ``resident`` maps a task name to the version new requests get, ordered from
    least to most recently used. A row is handed out free if one is, else taken
    from the least recently used resident version that no request holds
    (:meth:`reserve_row` says which, so the caller can count the eviction). A
    replaced version is *retired*: it keeps its row until its last lease ends.
    """

    def __init__(self, max_slots: int, on_change: Callable[[], None] = lambda: None):
        self.max_slots = max_slots
        self._on_change = on_change  # called when a row may have become free or evictable
        self.resident: OrderedDict[str, ActiveTask] = OrderedDict()
        self._free = list(range(max_slots, 0, -1))  # pop() hands out 1, 2, ...
        self._retired: list[ActiveTask] = []

    def get(self, name: str) -> ActiveTask | None:
        """``name``'s resident version (now the most recently used), or None."""
        task = self.resident.get(name)
        if task is not None:
            self.resident.move_to_end(name)
        return task

    def names(self) -> list[str]:
        return sorted(self.resident)

    def reserve_row(self) -> tuple[int, ActiveTask | None]:
        """A task row for a new version, and the version evicted to free it (None: the row was free).

        Raises :class:`NoFreeRowError` when every row is leased by in-flight requests.
        """
        self._collect()
        if self._free:
            return self._free.pop(), None
        for name, task in self.resident.items():  # least recently used first
            if task.leases == 0:
                del self.resident[name]
                task.retired = task.released = True
                return task.task_row, task
        raise NoFreeRowError(
            f"all {self.max_slots} injection slots (task rows) are held by in-flight requests "
            f"({len(self.resident)} resident tasks, {len(self._retired)} retired versions); raise --max-slots"
        )

    def free_rows(self) -> int:
        """Rows a new version can take without evicting anything."""
        self._collect()
        return len(self._free)

    def release_row(self, task_row: int) -> None:
        """Give back a reserved row that was never activated (a failed load)."""
        self._free.append(task_row)
        self._on_change()

    def activate(self, task: ActiveTask) -> ActiveTask | None:
        """Make ``task`` the resident version of its name; return the version it replaced."""
        old = self.resident.pop(task.name, None)
        self.resident[task.name] = task
        if old is not None:
            self.retire(old)
        self._on_change()
        return old

    def remove(self, name: str) -> ActiveTask | None:
        old = self.resident.pop(name, None)
        if old is not None:
            self.retire(old)
        return old

    def retire(self, task: ActiveTask) -> None:
        """Take ``task`` out of service: no new request gets it; its row is freed once unleased."""
        task.retired = True
        self._retired.append(task)
        self._collect()

    def _collect(self) -> None:
        """Free the rows of retired versions that no request holds any more."""
        still = []
        for task in self._retired:
            if task.leases == 0:
                task.released = True
                self._free.append(task.task_row)
            else:
                still.append(task)
        self._retired = still

    def hold(self, task: ActiveTask) -> None:
        """Lease ``task``'s row to one request: it is neither evicted nor freed until :meth:`release`."""
        if task.released:
            raise RuntimeError(f"task {task.name} run {task.run_id}: its row {task.task_row} was already given back")
        task.leases += 1

    def release(self, task: ActiveTask) -> None:
        task.leases -= 1
        if task.leases == 0:
            if task.retired:
                self._collect()
            self._on_change()

    @contextmanager
    def lease(self, task: ActiveTask) -> Iterator[ActiveTask]:
        """Hold ``task``'s row for the duration of one request."""
        self.hold(task)
        try:
            yield task
        finally:
            self.release(task)
