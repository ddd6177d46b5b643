"""The Ray job end to end: real local Ray, real actors, real LanceDB, real kills."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
from actor_kills import kill_and_wait

from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.federation_job.second_order import stats_size
from ifedicl.kernel.errors import FederationError
from ifedicl.kernel.sources import DataSource
from ifedicl.storage.store import Store


def _settings(**kw) -> FederationSettings:
    # one host per client (--actors 3): these tests kill a client by killing its process
    base = dict(clients=3, actors=3, alpha=1.0, rounds=2, min_clients=2, round_timeout_s=120, min_shard=4)
    return FederationSettings(**{**base, **kw})


def test_client_killed_between_rounds_is_dropped_and_recorded(ray_session, llama_dir, task_dir, tmp_path):
    killed = {}

    def kill_client_1_before_round_1(stage, round_index, results, actors):
        if stage == "broadcast" and 1 in actors:  # stage 1 done: client 1 dies before calibrating
            kill_and_wait(actors[1])
            killed["round"] = round_index + 1

    store_dir = tmp_path / "store"
    fed = Federation(
        str(llama_dir), DataSource(str(task_dir), max_test=8), str(store_dir), _settings(), None,
        kill_client_1_before_round_1,
    )  # fmt: skip
    result = fed.run(publish=True)
    assert killed == {"round": 1}
    round1 = result.rounds[1]
    assert round1.clients_answered == [0, 2] and "died" in round1.dropped[1]
    assert result.rounds[2].clients_sampled == [0, 2]  # the dead client is not asked again
    stored = Store(store_dir)
    rows = stored.rounds(result.run_id)
    assert json.loads(rows[1]["dropped"]) == {"1": round1.dropped[1]}
    assert stored.published_run_id(fed.task.name) == result.run_id
    # stage-2 uploads: the second-order round's statistics of 4L coefficients plus a header;
    # stage-1 uploads carry L*2*d int8 (the default coding)
    # and a float32 scale per (layer, block)
    L, d = fed.fingerprint.num_layers, fed.fingerprint.hidden_size
    stats_bytes = 4 * stats_size(4 * L, spread=True)  # the default check also sends its decrease's variance
    assert all(stats_bytes < b < stats_bytes + 512 for r in result.rounds[1:] for b in r.bytes_up)
    assert all(2 * L * d + 8 * L < b < 2 * L * d + 8 * L + 256 for b in result.rounds[0].bytes_up)


def test_too_few_clients_fails_cleanly_and_publishes_nothing(ray_session, llama_dir, task_dir, tmp_path):
    def kill_two(stage, round_index, results, actors):
        if stage == "broadcast":
            for cid in (0, 1):
                kill_and_wait(actors[cid])

    store_dir = tmp_path / "store"
    fed = Federation(
        str(llama_dir), DataSource(str(task_dir), max_test=0), str(store_dir), _settings(), None, kill_two
    )
    with pytest.raises(FederationError, match="round 1: only 1 client.*min_clients=2"):
        fed.run(publish=True)
    stored = Store(store_dir)
    (run,) = stored.runs()
    assert run["status"] == "failed" and "min_clients" in run["error"]
    assert stored.published() == {}


def _cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "ifedicl.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ifedicl {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_cli_federate_publishes_a_run_that_predict_reads(llama_dir, task_dir, tmp_path):
    store = tmp_path / "store"
    out = _cli(
        "federate",
        "--task-dir",
        task_dir,
        "--model",
        llama_dir,
        "--store",
        store,
        "--clients",
        2,
        "--alpha",
        1.0,
        "--rounds",
        2,
        "--max-test",
        10,
        "--publish",
    ).stdout
    assert "complete and published" in out and "per-round bytes per client" in out
    runs = [json.loads(line) for line in _cli("runs", "--store", store, "--json").stdout.splitlines()]
    assert len(runs) == 1 and runs[0]["status"] == "complete" and runs[0]["published"]
    pred = _cli(
        "predict",
        "--store",
        store,
        "--model",
        llama_dir,
        "--task",
        "demo-sentiment",
        "--json",
        "the acting was brilliant .",
        "the ending was dull .",
    ).stdout.splitlines()
    rows = [json.loads(line) for line in pred]
    assert [r["text"] for r in rows] == ["the acting was brilliant .", "the ending was dull ."]
    for r in rows:
        assert set(r["probabilities"]) == {"negative", "positive"}
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-6
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)


def test_shared_and_per_actor_weights_give_the_same_run(ray_session, llama_dir, task_dir, tmp_path):
    results = {}
    for mode in ("shared", "per-actor"):
        settings = _settings(clients=2, rounds=1, min_clients=1, weights=mode)
        fed = Federation(str(llama_dir), DataSource(str(task_dir), max_test=0), str(tmp_path / mode), settings)
        results[mode] = fed.run()
    shared, own = results["shared"], results["per-actor"]
    assert np.allclose(shared.vectors, own.vectors, atol=1e-6)
    assert np.allclose(shared.coefficients, own.coefficients, atol=1e-5)


def test_int8_vector_coding_quarters_stage_one_and_lambda_travels_as_a_frame(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Through Ray: clients upload int8 v_k (+ scales), the server decodes before aggregating; Λ is a frame."""
    from ifedicl.federation_job import wire
    from ifedicl.federation_job.vector_coding import upload_reader

    uploads = {}

    def keep_uploads(stage, round_index, results, actors):
        if stage == "extract":
            uploads.update(results)

    settings = _settings(clients=2, rounds=1, min_clients=2, vector_coding="int8", stage2="local-steps")
    fed = Federation(
        str(llama_dir), DataSource(str(task_dir), max_test=0), str(tmp_path / "store"), settings, None, keep_uploads
    )
    result = fed.run()
    L, d = fed.fingerprint.num_layers, fed.fingerprint.hidden_size
    assert result.rounds[0].bytes_up == [len(uploads[c]) for c in result.rounds[0].clients_answered]
    decoded = []
    for payload in uploads.values():
        arrays, meta = wire.decode(payload)
        assert arrays["vectors"].dtype == np.int8 and arrays["scale"].shape == (L, 2)
        as_float32 = wire.encode({"vectors": arrays["vectors"].astype(np.float32)}, **meta)  # the same upload uncoded
        saved = len(as_float32) - len(payload)  # 4 bytes -> 1 per value, less the scales and their header entry
        assert 3 * L * 2 * d - 8 * L - 128 < saved < 3 * L * 2 * d
        decoded.append(upload_reader("int8")(payload, 0)[0])
    assert np.allclose(result.vectors, np.mean(decoded, axis=0), atol=1e-6)  # aggregated after decoding
    assert [b for r in result.rounds[1:] for b in r.bytes_up] == [wire.frame_size(L)] * 2
    assert len(result.summary["rounds"][1]["client_seconds"]["calibrate"]) == 2  # the frame carries compute
    assert result.rounds[1].mean_loss is not None and np.isfinite(result.rounds[1].mean_loss)  # and the loss


def test_a_run_in_the_same_ray_reuses_the_last_runs_client_processes_emptied(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Kept actors (ray_pool.WarmActors) carry no client between runs: a run on them equals one on fresh
    processes, and one that died while kept is replaced without a drop."""
    seen: dict[str, dict] = {}

    def processes(run: str):
        def note(stage, round_index, results, actors):
            if stage == "extract":
                seen[run] = dict(actors)

        return note

    def pids(run: str) -> dict[int, int]:
        return {cid: ray.get(a.__ray_call__.remote(lambda self: os.getpid())) for cid, a in seen[run].items()}

    def federate(run: str, per_actor: bool = False):
        settings = _settings(clients=2, rounds=1, min_clients=2, weights="per-actor" if per_actor else "shared")
        source = DataSource(str(task_dir), max_test=0)
        return Federation(str(llama_dir), source, str(tmp_path / run), settings, None, processes(run)).run()

    first = federate("first")
    first_pids = pids("first")
    kept = list(seen["first"].values())
    assert not any(ray.get([a.__ray_call__.remote(lambda self: hasattr(self, "client")) for a in kept]))
    second = federate("second")
    assert pids("second") == first_pids  # the same processes, each with a new client
    assert np.array_equal(second.vectors, first.vectors) and np.array_equal(second.coefficients, first.coefficients)

    kill_and_wait(seen["second"][0])  # dies while kept between runs, and Ray takes its CPU back
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    third = federate("third", per_actor=True)  # and the kept one now loads its own weights
    assert third.rounds[0].clients_answered == [0, 1] and not third.rounds[0].dropped
    assert first_pids[1] in pids("third").values() and first_pids[0] not in pids("third").values()
    assert np.allclose(third.vectors, first.vectors, atol=1e-6)
    assert np.allclose(third.coefficients, first.coefficients, atol=1e-5)
