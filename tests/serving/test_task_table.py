"""The engine's table rows as a bounded LRU cache of task versions (pure bookkeeping, no engine)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec
from ifedicl.serving.task_cache import ActiveTask, NoFreeRowError, TaskTable


def version(table: TaskTable, name: str, run_id: str = "r1") -> ActiveTask:
    task_row, _ = table.reserve_row()
    task = ActiveTask(TaskSpec(name, *KNOWN_TASKS["sst2"]), run_id, task_row, [1, 2], datetime.now(UTC), 1)
    table.activate(task)
    return task


def test_least_recently_used_unleased_version_is_evicted():
    table = TaskTable(max_slots=3)
    a, b, c = (version(table, name) for name in "abc")
    assert {a.task_row, b.task_row, c.task_row} == {1, 2, 3} and table.free_rows() == 0
    table.get("a")  # a is now the most recently used; b the least
    task_row, evicted = table.reserve_row()
    assert evicted is b and task_row == b.task_row and b.released and "b" not in table.resident
    with table.lease(c):  # c is the least recently used now, but in use: a goes instead
        task_row, evicted = table.reserve_row()
    assert evicted is a and task_row == a.task_row and not c.released


def test_no_row_while_every_version_is_leased():
    table = TaskTable(max_slots=2)
    a, b = version(table, "a"), version(table, "b")
    with table.lease(a), table.lease(b), pytest.raises(NoFreeRowError, match="in-flight"):
        table.reserve_row()
    assert table.reserve_row()[1] is a  # once released, the LRU one is taken


def test_replaced_version_keeps_its_row_until_its_last_lease_ends():
    table = TaskTable(max_slots=2)
    old = version(table, "a", "r1")
    with table.lease(old):
        new = version(table, "a", "r2")
        assert old.retired and not old.released and table.get("a") is new
        assert table.free_rows() == 0  # old's row is still in use
    assert old.released and table.free_rows() == 1
    with pytest.raises(RuntimeError, match="given back"), table.lease(old):
        pass
