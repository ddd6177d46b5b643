"""`ifedicl publish` / `rollback` as a user runs them: real processes on a real store."""

from __future__ import annotations

import subprocess
import sys

from publication_races import TASK, complete_run

from ifedicl.storage.store import Store


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ifedicl.cli", *args], capture_output=True, text=True, timeout=120)


def test_publish_then_roll_back_two_levels_then_past_the_first(tmp_path):
    uri = str(tmp_path / "store")
    store = Store(uri, create=True)
    a, b, c = (complete_run(store, seed) for seed in (1, 2, 3))
    store.publish(a)
    store.publish(b)  # each CLI call is a ~2.5 s interpreter start: one publish through it is enough
    res = _cli("publish", c, "--store", uri)
    assert res.returncode == 0 and f"published {c} for task {TASK.name}" in res.stdout, res.stderr
    assert store.published_run_id(TASK.name) == c
    for expected in (b, a):
        res = _cli("rollback", TASK.name, "--store", uri)
        assert res.returncode == 0 and f"rolled back to {expected}" in res.stdout, res.stderr
    res = _cli("rollback", TASK.name, "--store", uri)
    assert (
        res.returncode == 2
        and res.stderr.strip() == f"error: task {TASK.name} has no earlier published run to roll back to"
    )
    assert "Traceback" not in res.stderr
    log = store.publication_log(TASK.name)
    assert [(e["seq"], e["action"], e["run_id"]) for e in log] == [
        (1, "publish", a), (2, "publish", b), (3, "publish", c), (4, "rollback", b), (5, "rollback", a)
    ]  # fmt: skip
    assert store.published() == {TASK.name: a}


def test_a_store_path_that_is_a_file_is_a_clear_error_and_stays_untouched(tmp_path):
    path = tmp_path / "store.lance"
    path.write_bytes(b"not a store\n")
    res = _cli("publish", "some-run", "--store", str(path))
    assert (
        res.returncode == 2
        and res.stderr.strip() == f"error: store {path} is a file, not a store directory (nothing was read or written)"
    )
    assert path.read_bytes() == b"not a store\n" and sorted(tmp_path.iterdir()) == [path]
