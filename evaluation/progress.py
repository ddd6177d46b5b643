"""The grid's progress lines on stderr: each cell as it starts (with the ETA) and as it finishes."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import numpy as np

from ifedicl.evaluation.columns import column_label
from ifedicl.evaluation.render import fmt_duration
from ifedicl.evaluation.settings import FEDERATED, Cell


class Group(Protocol):
    """What a progress line needs of the grid's group (:class:`ifedicl.evaluation.grid.Group`)."""

    model: str

    def column(self, method: str) -> str: ...


class Progress:
    """One line per cell on stderr: which cell, its index in the grid, and the ETA from measured costs.

    A cell's expected wall time is the mean of finished cells of the same (model, method,
    objective) when there are any, else of the same method on any model, else unknown. With ``workers``
    processes the ETA is the larger of the federated cells' sum (they run one at a time) and the whole
    sum shared among the workers (the walls measured were measured sharing the machine alike).
    """

    def __init__(
        self, finished: list[dict], todo: list[tuple[Group, Cell]], total: int, stream=None, workers: int = 1
    ):
        self.workers = workers
        self.costs: dict[tuple, list[float]] = defaultdict(list)
        for record in finished:
            self._add(record["_group_model"], record["method"], record["_group_column"], record["cost"]["wall_s"])
        self.todo = list(todo)
        self.total = total
        self.done = total - len(todo)
        self.stream = stream or sys.stderr
        self.started = time.monotonic()

    def _add(self, model: str, method: str, column: str, wall: float) -> None:
        self.costs[(model, column)].append(wall)
        self.costs[("*", method)].append(wall)

    def expected(self, group: Group, cell: Cell) -> float | None:
        for key in ((group.model, group.column(cell.method)), ("*", cell.method)):
            if self.costs.get(key):
                return float(np.mean(self.costs[key]))
        return None

    def eta(self) -> tuple[float, int]:
        """Seconds expected for the cells still to do, and how many of them have no estimate yet."""
        guesses = [(c.method in FEDERATED, self.expected(g, c)) for g, c in self.todo]
        known = [(federated, x) for federated, x in guesses if x is not None]
        every = sum(x for _, x in known)
        one_at_a_time = sum(x for federated, x in known if federated)
        return float(max(one_at_a_time, every / self.workers)), len(guesses) - len(known)

    def before(self, group: Group, cell: Cell, task_name: str) -> None:
        eta, unknown = self.eta()
        timed = len(self.todo) - unknown
        if unknown:
            eta_text = f"ETA {fmt_duration(eta)} for {timed} cell(s) + {unknown} of methods not yet timed"
        else:
            eta_text = f"ETA {fmt_duration(eta)}"
        guess = self.expected(group, cell)
        self.stream.write(
            f"[report {self.done + 1}/{self.total}] {_cell_label(group, cell, task_name)}: "
            f"~{fmt_duration(guess)}; {eta_text}\n"
        )
        self.stream.flush()

    def after(self, group: Group, cell: Cell, record: dict) -> None:
        self._add(group.model, cell.method, group.column(cell.method), record["cost"]["wall_s"])
        self.todo = [(g, c) for g, c in self.todo if not (g is group and c == cell)]
        self.done += 1
        # Named: with --workers, the line before this one may be another cell's start.
        self.stream.write(
            f"[report {self.done}/{self.total}] {_cell_label(group, cell, Path(cell.task).name)} "
            f"done in {fmt_duration(record['cost']['wall_s'])} "
            f"(cpu {record['cost']['cpu_s']:.0f} s), accuracy {100 * record['accuracy']:.1f}\n"
        )
        self.stream.flush()


def _cell_label(group: Group, cell: Cell, task_name: str) -> str:
    return f"{group.model} {task_name} seed {cell.seed} {column_label(group.column(cell.method))}"
