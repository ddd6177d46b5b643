"""Faults: clients killed at every stage, a stuck client, the driver SIGKILLed mid-run, a read-only store.

Real Ray, real LanceDB, real kills (``ray.kill``, SIGKILL of the driver's process group).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from actor_kills import kill_and_wait

from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.kernel.modeling import ModelFingerprint
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage.store import Store, StoreError


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_clients_killed_at_every_stage(ray_session, llama_dir, task_dir, tmp_path):
    """0 while loading, 1 once loaded (its extraction call fails), 2 mid-calibration (seen burning CPU),
    3 right after its upload.

    A kill races the work it interrupts: client 1 is killed once loaded and seen dead before
    extraction is dispatched (a tiny model's extraction can finish before a kill lands); client 2
    gets 25 local epochs, so its calibration is still running when the kill arrives.
    """
    pids: dict[int, int] = {}
    events: list[str] = []

    def on_dispatch(stage, round_index, actors):
        if stage == "load":
            ray.kill(actors[0])
            events.append("load")
            ray.get(actors[1].__ray_call__.remote(lambda host: len(host.clients)))  # queued after 1's join: it joined
            kill_and_wait(actors[1])
            events.append("extract")
        elif stage == "calibrate" and round_index == 1:
            before = _cpu_seconds(pids[2])
            deadline = time.monotonic() + 120
            while _cpu_seconds(pids[2]) - before < 0.05 and time.monotonic() < deadline:
                time.sleep(0.01)  # wait until client 2 is computing its calibration, then kill it
            ray.kill(actors[2])
            events.append("calibrate")

    def on_gather(stage, round_index, results, actors):
        if stage == "broadcast":
            pids[2] = _pid(actors[2])
        if stage == "calibrate" and round_index == 1:
            assert 3 in results  # it uploaded ...
            ray.kill(actors[3])  # ... and dies before round 2
            events.append("after upload")

    settings = FederationSettings(
        clients=6, actors=6, alpha=100.0, rounds=2, local_epochs=25, min_clients=2, round_timeout_s=120, min_shard=4,
        stage2="local-steps",  # 25 local epochs keep client 2 busy long enough to be killed mid-calibration
    )  # one host per client (--actors 6): each kill takes one client
    store_dir = tmp_path / "store"
    fed = Federation(
        str(llama_dir), DataSource(str(task_dir), max_test=0), str(store_dir), settings, on_dispatch, on_gather
    )
    result = fed.run(publish=True)
    assert events == ["load", "extract", "calibrate", "after upload"]
    r0, r1, r2 = result.rounds
    assert "while loading" in r0.dropped[0] and "died" in r0.dropped[1]
    assert r0.clients_answered == [2, 3, 4, 5]
    assert list(r1.dropped) == [2] and "died" in r1.dropped[2] and r1.clients_answered == [3, 4, 5]
    assert list(r2.dropped) == [3] and "died" in r2.dropped[3] and r2.clients_answered == [4, 5]
    store = Store(store_dir)
    rows = store.rounds(result.run_id)
    assert [sorted(json.loads(r["dropped"])) for r in rows] == [["0", "1"], ["2"], ["3"]]
    assert store.published_run_id(fed.task.name) == result.run_id


def _federate_cmd(llama_dir, task_dir, store, *extra):
    return [
        sys.executable, "-m", "ifedicl.cli", "federate", "--task-dir", str(task_dir), "--model", str(llama_dir),
        "--store", str(store), "--clients", "2", "--alpha", "1.0", "--max-test", "0", "--publish", *map(str, extra),
    ]  # fmt: skip


def test_a_stuck_client_is_dropped_at_the_round_timeout_and_the_run_completes(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Client 2 is alive but stuck: it sits 600 s on every calibration request (adversary mode ``hang``).

    Round 1 drops it when the round timeout runs out, with that reason in the round record and the
    store; round 2 does not ask it again; the run completes and publishes with the other two. The
    honest clients answer in about a second on an idle machine: 20 s leaves room for the other pytest
    worker's load. Loading gets its own, generous timeout: a busy machine loads slowly.
    """
    timeout_s = 20.0
    settings = FederationSettings(
        clients=3, alpha=100.0, rounds=2, min_clients=2, round_timeout_s=timeout_s, load_timeout_s=120,
        min_shard=4, adversaries={2: "hang:600"},
    )  # fmt: skip
    store_dir = tmp_path / "store"
    fed = Federation(str(llama_dir), DataSource(str(task_dir), max_train=30, max_test=0), str(store_dir), settings)
    result = fed.run(publish=True)
    r0, r1, r2 = result.rounds
    assert r0.clients_answered == [0, 1, 2] and not r0.dropped
    assert r1.clients_sampled == [0, 1, 2] and r1.clients_answered == [0, 1]
    assert r1.dropped == {2: "timed out after 20s"}
    assert timeout_s <= r1.seconds < timeout_s + 30  # waited for the deadline, not for the stuck client
    assert r2.clients_sampled == [0, 1] and r2.clients_answered == [0, 1] and not r2.dropped
    store = Store(store_dir)
    assert [json.loads(r["dropped"]) for r in store.rounds(result.run_id)] == [{}, {"2": "timed out after 20s"}, {}]
    assert result.summary["rounds"][1]["answered"] == 2
    assert store.published_run_id(fed.task.name) == result.run_id


def test_driver_killed_mid_run_is_marked_failed_and_a_rerun_succeeds(ray_session, llama_dir, task_dir, tmp_path):
    store_dir = tmp_path / "store"
    proc = subprocess.Popen(
        _federate_cmd(llama_dir, task_dir, store_dir, "--rounds", 200),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the driver and the Ray it started
    )
    try:
        deadline = time.monotonic() + 300
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                store = Store(store_dir)
                runs = store.runs()
                if runs and len(store.rounds(runs[0]["run_id"])) >= 2:  # stage 1 and round 1 written
                    run_id = runs[0]["run_id"]
                    break
            except (StoreError, ValueError, OSError):
                continue
        assert run_id is not None, "the driver never reached round 1"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    store = Store(store_dir)
    assert store.run_row(run_id)["status"] == "running"  # nobody could mark it
    with pytest.raises(StoreError, match="not complete"):
        store.load_run("demo-sentiment", run_id)  # its half-written rows are not loadable ...
    assert store.published() == {}  # ... and nothing was published

    settings = FederationSettings(clients=2, alpha=1.0, rounds=1, min_clients=1, round_timeout_s=120, min_shard=4)
    rerun = Federation(str(llama_dir), DataSource(str(task_dir), max_train=20, max_test=0), str(store_dir), settings)
    result = rerun.run(publish=True)
    dead = store.run_row(run_id)
    assert dead["status"] == "failed" and "driver died" in dead["error"]
    assert store.published_run_id("demo-sentiment") == result.run_id
    assert store.load_run("demo-sentiment").run_id == result.run_id


def _seed_store(path) -> str:
    """A store holding one complete, published run (written through the Store API, no federation)."""
    store = Store(path, create=True)
    task = TaskSpec("demo-sentiment", "Review: {text}\nSentiment:", ("negative", "positive"))
    run_id = store.start_run(task, ModelFingerprint("m", 2, 8, "h"), {})
    store.write_vectors(run_id, task.name, np.zeros((2, 2, 8), np.float32))
    store.write_coefficients(run_id, task.name, 0, np.ones((2, 2, 2), np.float32))
    store.finish_run(run_id, {})
    store.publish(run_id)
    return run_id


def _read_only(cmd: list[str], path) -> list[str]:
    """Run ``cmd`` with ``path`` read-only: a private read-only bind mount as root, file modes otherwise."""
    if os.geteuid() != 0:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o555)
        os.chmod(path, 0o555)
        return cmd
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return [shutil.which("unshare"), "-m", "sh", "-c", script, str(path), *cmd]


def test_read_only_store_gives_a_clear_error_and_publishes_nothing(llama_dir, task_dir, tmp_path):
    store_dir = tmp_path / "store"
    published = _seed_store(store_dir)
    before = sorted(os.listdir(store_dir))
    cmd = _read_only(_federate_cmd(llama_dir, task_dir, store_dir, "--rounds", 1), store_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "error: store" in proc.stderr and "not writable" in proc.stderr and "Traceback" not in proc.stderr
    store = Store(store_dir)
    assert [r["run_id"] for r in store.runs()] == [published]
    assert store.published_run_id("demo-sentiment") == published
    assert sorted(os.listdir(store_dir)) == before


def test_reaping_tells_dead_remote_and_live_drivers_apart(tmp_path):
    """Same host: a gone pid is proof. Other host: only a missed heartbeat (4x round timeout + 60 s) is."""
    from datetime import timedelta

    from ifedicl.federation_job import liveness

    store = Store(tmp_path / "store", create=True)
    task = TaskSpec("demo-sentiment", "Review: {text}\nSentiment:", ("negative", "positive"))
    fp = ModelFingerprint("m", 2, 8, "h")
    me = liveness.driver_identity()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {**me, "pid": gone.pid, "pid_start": "1"}
    remote = {**me, "host": "another-host"}
    runs = {
        name: store.start_run(task, fp, {"driver": identity, "round_timeout_s": 10.0})
        for name, identity in (("alive", me), ("dead", dead), ("remote", remote))
    }
    created = store.run_row(runs["remote"])["created_at"]
    soon = liveness.reap_dead_runs(store, now=created + timedelta(seconds=60))
    assert list(soon) == [runs["dead"]] and "driver died" in soon[runs["dead"]]
    later = liveness.reap_dead_runs(store, now=created + timedelta(seconds=101))
    assert list(later) == [runs["remote"]] and "no heartbeat" in later[runs["remote"]]
    statuses = {name: store.run_row(run_id)["status"] for name, run_id in runs.items()}
    assert statuses == {"alive": "running", "dead": "failed", "remote": "failed"}
