"""A run's status moves once, from ``running``, by compare-and-set (issue 31, item 4).

Real LanceDB stores throughout: the reaper against a run finished under its feet, a failure
reported after a run was finished and published, two processes racing to finish and fail the
same runs, the reaper's staleness before the clients have loaded, and corrupt run rows.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from ifedicl.federation_job import liveness
from ifedicl.kernel.modeling import ModelFingerprint
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage import schema
from ifedicl.storage.records import RoundRecord
from ifedicl.storage.store import Store, StoreError

TASK = TaskSpec("demo-sentiment", "Review: {text}\nSentiment:", ("negative", "positive"))
FP = ModelFingerprint("m", 2, 8, "h")
REMOTE = {"host": "another-host", "boot_id": "x", "pid": 1, "pid_start": "1"}  # only a heartbeat can tell


def _run(store: Store, task: TaskSpec = TASK, **settings) -> str:
    """A run with its tables written, still ``running``."""
    run_id = store.start_run(task, FP, {"driver": REMOTE, "round_timeout_s": 10.0, **settings})
    store.write_vectors(run_id, task.name, np.zeros((2, 2, 8), np.float32))
    store.write_coefficients(run_id, task.name, 0, np.ones((2, 2, 2), np.float32))
    return run_id


class FinishedUnderTheReaper(Store):
    """A real store whose run ``run_id`` is finished and published by "its driver" right after the reaper
    listed the runs (the reaper saw it ``running``): the interleaving the race needs, made certain."""

    run_id = ""

    def runs(self, task: str | None = None) -> list[dict]:
        rows = super().runs(task)
        if self.run_id:
            Store(self.uri).finish_run(self.run_id, {"accuracy": 0.9})
            Store(self.uri).publish(self.run_id)
            self.run_id = ""
        return rows


def test_the_reaper_never_fails_a_run_its_driver_just_finished_and_published(tmp_path):
    store = FinishedUnderTheReaper(tmp_path / "store", create=True)
    run_id = store.run_id = _run(store)
    created = store.run_row(run_id)["created_at"]
    reaped = liveness.reap_dead_runs(store, now=created + timedelta(hours=1))  # long stale by its heartbeat
    assert reaped == {}  # it lost the compare-and-set: nothing reaped, nothing reported as reaped
    row = store.run_row(run_id)
    assert row["status"] == "complete" and row["error"] is None
    assert store.load_run(TASK.name).run_id == run_id  # still served and loadable


def test_a_failure_after_finish_is_a_reported_no_op_and_finish_after_failure_refuses(tmp_path, caplog):
    store = Store(tmp_path / "store", create=True)
    done = _run(store)
    store.finish_run(done, {"accuracy": 0.9})
    store.publish(done)
    with caplog.at_level(logging.WARNING, logger="ifedicl.storage"):
        assert store.fail_run(done, "KeyboardInterrupt: during the post-publish compaction") is False
    assert f"run {done} is complete: not marked failed" in caplog.text
    row = store.run_row(done)
    assert row["status"] == "complete" and row["error"] is None and json.loads(row["summary"]) == {"accuracy": 0.9}
    assert store.load_run(TASK.name).run_id == done

    reaped = _run(store)
    assert store.fail_run(reaped, "no heartbeat") is True
    with pytest.raises(StoreError, match=rf"run {reaped} is failed, not running, so it was not marked complete"):
        store.finish_run(reaped, {"accuracy": 0.5})
    assert store.run_row(reaped)["status"] == "failed" and store.run_row(reaped)["summary"] is None
    assert store.fail_run(reaped, "again") is False and store.run_row(reaped)["error"] == "no heartbeat"
    assert len(store.runs()) == 2  # a move rewrites its row, never duplicates it


def _race(uri: str, run_ids: list[str], action: str, barrier, out) -> None:
    """One process: finish (or fail) each run in turn, released together with the other per run."""
    store = Store(uri)
    won = []
    for run_id in run_ids:
        barrier.wait(timeout=120)
        if action == "finish":
            try:
                store.finish_run(run_id, {"by": "finisher"})
                won.append(run_id)
            except StoreError:
                pass
        elif store.fail_run(run_id, "by the reaper"):
            won.append(run_id)
    out.put((action, won))


def test_two_processes_racing_to_finish_and_fail_the_same_runs_each_win_a_run_at_most_once(tmp_path):
    uri = str(tmp_path / "store")
    store = Store(uri, create=True)
    run_ids = [store.start_run(TASK, FP, {}) for _ in range(12)]
    ctx = multiprocessing.get_context("spawn")  # LanceDB's runtime does not survive fork
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(uri, run_ids, a, barrier, out)) for a in ("finish", "fail")]
    for proc in procs:
        proc.start()
    won = dict(out.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    finished, failed = set(won["finish"]), set(won["fail"])
    assert not finished & failed and finished | failed == set(run_ids)  # exactly one winner per run
    rows = {row["run_id"]: row for row in Store(uri).runs()}
    assert len(Store(uri).runs()) == len(run_ids)
    for run_id in run_ids:
        row = rows[run_id]
        if run_id in finished:
            assert row["status"] == "complete" and json.loads(row["summary"]) == {"by": "finisher"}
            assert row["error"] is None
        else:
            assert row["status"] == "failed" and row["error"] == "by the reaper" and row["summary"] is None


def test_a_run_still_loading_within_its_load_timeout_is_not_stale(tmp_path):
    store = Store(tmp_path / "store", create=True)
    loading = _run(store, load_timeout_s=600.0)  # a big model: clients may load for 10 minutes
    plain = _run(store)  # no load timeout: loading is bounded by the round timeout, as before
    created = store.run_row(loading)["created_at"]
    at = {run_id: store.run_row(run_id)["created_at"] for run_id in (loading, plain)}
    # 4 x 10 s + 60 s between writes, plus the 590 s its clients may load beyond one round timeout
    assert liveness.stale_after_s({"round_timeout_s": 10.0, "load_timeout_s": 600.0}, rounds_written=0) == 690.0
    assert liveness.stale_after_s({"round_timeout_s": 10.0, "load_timeout_s": 600.0}, rounds_written=1) == 100.0
    soon = liveness.reap_dead_runs(store, now=max(at.values()) + timedelta(seconds=101))
    assert list(soon) == [plain] and store.run_row(loading)["status"] == "running"
    later = liveness.reap_dead_runs(store, now=created + timedelta(seconds=691))
    assert list(later) == [loading] and "no heartbeat for 691s" in later[loading]

    # once its first round is written, the load allowance no longer applies
    loaded = _run(store, load_timeout_s=600.0)
    store.record_round(loaded, RoundRecord(0, [0], [0], {}, None, [1], [1], 1.0))
    last = store.rounds(loaded)[-1]["at"]
    assert liveness.reap_dead_runs(store, now=last + timedelta(seconds=99)) == {}
    assert list(liveness.reap_dead_runs(store, now=last + timedelta(seconds=101))) == [loaded]


def _corrupt_row(run_id: str, task: str, **overrides) -> dict:
    row = {
        "run_id": run_id, "task": task, "task_spec": json.dumps({**TASK.to_dict(), "name": task}),
        "status": "complete", "created_at": datetime.now(UTC), "finished_at": datetime.now(UTC),
        "model_id": FP.model_id, "num_layers": FP.num_layers, "hidden_size": FP.hidden_size,
        "config_hash": FP.config_hash, "settings": "{}", "summary": "{}", "error": None, "code_version": "",
    }  # fmt: skip
    return {**row, **overrides}


def test_a_corrupt_run_row_is_skipped_and_logged_and_never_hides_the_other_tasks(tmp_path, caplog):
    store = Store(tmp_path / "store", create=True)
    good = _run(store)
    store.finish_run(good, {})
    store.publish(good)
    corrupt = {
        "bad-json": _corrupt_row("bad-json-run", "bad-json", task_spec="{not json"),
        "bad-spec": _corrupt_row("bad-spec-run", "bad-spec", task_spec=json.dumps({"name": "bad-spec"})),
        "bad-settings": _corrupt_row("bad-settings-run", "bad-settings", settings="[unclosed"),
    }
    store._append("runs", schema.RUNS, list(corrupt.values()))
    for row in corrupt.values():
        store.publish(row["run_id"])  # publishing checks the status only
    store._append_publication("ghost", lambda stack: ("no-such-run", "publish"))  # a log entry without a run row
    with caplog.at_level(logging.ERROR, logger="ifedicl.storage"):
        served = store.published_runs()
    assert sorted(served) == [TASK.name] and served[TASK.name].run_id == good
    for task, row in corrupt.items():
        assert f"run {row['run_id']} of task {task} cannot be read" in caplog.text
    assert "task ghost publishes run no-such-run, which has no run row: task skipped" in caplog.text

    # the reaper skips a running row it cannot read, and reaps the rest
    store._append("runs", schema.RUNS, [_corrupt_row("unreadable-run", TASK.name, status="running", settings="{")])
    stale = _run(store)
    with caplog.at_level(logging.ERROR, logger="ifedicl.federation"):
        reaped = liveness.reap_dead_runs(store, now=datetime.now(UTC) + timedelta(hours=1))
    assert list(reaped) == [stale] and "run unreadable-run: its row cannot be read" in caplog.text
    assert store.run_row("unreadable-run")["status"] == "running"
