"""Publish, rollback and compare-and-set publish raced by real processes on one real LanceDB store.

Before the log was keyed, a publish wrote ``seq = count_rows() + 1`` and a conditional publish
read then wrote: two processes could write the same seq (a replay then depends on row order)
and both "publish if live is still X" calls could succeed. These tests fail on that code.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections import Counter

import pytest
from publication_races import TASK, complete_run, conditional_publishes, publish_rollback_pairs

from ifedicl.storage.store import PublicationConflict, Store

PAIRS = 50
ROUNDS = 15
SPAWN = multiprocessing.get_context("spawn")  # fork can deadlock LanceDB's runtime in the child


def _race(target, store: Store, args_per_racer: list[tuple], processes: bool) -> dict:
    """Run ``target(store, *args, barrier, results)`` in one process (or thread) per racer; collect results."""
    if processes:
        barrier, results = SPAWN.Barrier(len(args_per_racer)), SPAWN.Queue()
        racers = [SPAWN.Process(target=target, args=(store.uri, *a, barrier, results)) for a in args_per_racer]
        for racer in racers:
            racer.start()
        out = dict(results.get(timeout=120) for _ in racers)  # drain before join: a full pipe blocks the child
        for racer in racers:
            racer.join(timeout=30)
        assert [racer.exitcode for racer in racers] == [0] * len(racers)
        return out
    # threads sharing one connection: the only way two writers share a memory:// object store
    barrier, results = threading.Barrier(len(args_per_racer)), queue.Queue()
    racers = [threading.Thread(target=target, args=(store, *a, barrier, results)) for a in args_per_racer]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
    assert results.qsize() == len(racers), "a racing thread failed"
    return dict(results.get() for _ in racers)


def check_log(store: Store, task: str) -> list[dict]:
    """The log of ``task`` is 1..n, each entry was decided on the state it sits on, and replay is what is live."""
    entries = store.publication_log(task)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    stack: list[str] = []
    for entry in entries:
        if entry["action"] == "publish":
            stack.append(entry["run_id"])
        else:
            assert len(stack) >= 2 and entry["run_id"] == stack[-2], (entry, stack)
            stack.pop()
    assert store.published_run_id(task) == stack[-1]
    return entries


@pytest.fixture(params=["local-processes", "object-store-threads"])
def racing_store(request, tmp_path):
    """A store with one published base run: a local directory raced by processes, or memory:// by threads."""
    processes = request.param == "local-processes"
    store = Store(tmp_path / "store" if processes else "memory://races", create=True)
    base = complete_run(store, 0)
    store.publish(base)
    return store, base, processes


def test_racing_publish_rollback_pairs_lose_and_duplicate_nothing(racing_store):
    store, base, processes = racing_store
    runs = [complete_run(store, seed) for seed in (1, 2)]
    results = _race(publish_rollback_pairs, store, [(run, PAIRS) for run in runs], processes)
    entries = check_log(store, TASK.name)
    assert len(entries) == 1 + 2 * 2 * PAIRS  # every successful call is in the log exactly once
    logged = Counter((e["action"], e["run_id"]) for e in entries[1:])
    called = Counter(call for calls in results.values() for call in calls)
    assert logged == called
    assert logged[("publish", runs[0])] == logged[("publish", runs[1])] == PAIRS
    assert store.published() == {TASK.name: base}  # every publish was rolled back


def test_racing_conditional_publishes_succeed_once_per_live_run(racing_store):
    store, base, processes = racing_store
    runs = [[complete_run(store, 100 * racer + i) for i in range(ROUNDS)] for racer in (1, 2)]
    results = _race(conditional_publishes, store, [(racer_runs,) for racer_runs in runs], processes)
    entries = check_log(store, TASK.name)
    for round_index in range(ROUNDS):
        outcomes = sorted(results[racer_runs[0]][round_index] for racer_runs in runs)
        assert [o[0] for o in outcomes] == ["lost", "won"]  # both expected the same live run; one won
        assert outcomes[0][1] == outcomes[1][1]
    assert len(entries) == 1 + ROUNDS  # and only the winners are in the log


def test_conditional_publish_and_rollback_refuse_a_changed_live_run(tmp_path):
    store = Store(tmp_path / "store", create=True)
    first, second = complete_run(store, 1), complete_run(store, 2)
    store.publish(first, expect_live=None)
    with pytest.raises(PublicationConflict, match="live run is"):
        store.publish(second, expect_live=None)
    store.publish(second, expect_live=first)
    with pytest.raises(PublicationConflict):
        store.rollback(TASK.name, expect_live=first)
    assert store.rollback(TASK.name, expect_live=second) == first
    assert [e["action"] for e in check_log(store, TASK.name)] == ["publish", "publish", "rollback"]


def test_a_legacy_unkeyed_log_is_carried_over_on_the_first_write(tmp_path):
    """A store written before the log was keyed: its ``publications`` entries stay the history."""
    import pyarrow as pa

    store = Store(tmp_path / "store", create=True)
    first, second, third = (complete_run(store, seed) for seed in (1, 2, 3))
    legacy = pa.schema([f for f in store_schema_fields() if f.name != "key"])
    rows = [
        {"task": TASK.name, "run_id": run, "action": "publish", "seq": seq, "at": entry_time()}
        for seq, run in ((1, first), (3, second))  # global seqs: seq 2 was another task's
    ]
    store.db.create_table("publications", pa.Table.from_pylist(rows, schema=legacy))
    assert store.published_run_id(TASK.name) == second
    store.publish(third)
    assert store.rollback(TASK.name) == second and store.rollback(TASK.name) == first
    assert [e["seq"] for e in store.publication_log(TASK.name)] == [1, 3, 4, 5, 6]


def store_schema_fields():
    from ifedicl.storage import schema

    return list(schema.PUBLICATIONS)


def entry_time():
    from datetime import UTC, datetime

    return datetime.now(UTC)
