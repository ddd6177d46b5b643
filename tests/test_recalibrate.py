"""`ifedicl recalibrate` for real: local Ray, real LanceDB, a real file lock, real subprocesses."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest
from filelock import FileLock
from typer.testing import CliRunner

from ifedicl.cli.main import app
from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.federation_job.recalibrate import default_lock_path, recalibrate
from ifedicl.kernel.sources import DataSource
from ifedicl.storage.recalibrations import attempts
from ifedicl.storage.store import Store
from ifedicl.storage.store_metrics import RecalibrationCollector

TASK = "demo-sentiment"


def _settings(rounds: int) -> FederationSettings:
    return FederationSettings(clients=2, alpha=1.0, rounds=rounds, min_clients=1, round_timeout_s=120, min_shard=4)


def _source(task_dir) -> DataSource:
    return DataSource(str(task_dir), max_train=32, max_test=12)


@pytest.fixture(scope="module")
def published_live_run(ray_session, llama_dir, task_dir, tmp_path_factory):
    """A store whose live run is stage 1 + zero rounds (Λ = identity), published: federated once per module."""
    store_dir = tmp_path_factory.mktemp("live") / "store"
    result = Federation(str(llama_dir), _source(task_dir), str(store_dir), _settings(0)).run(publish=True)
    return store_dir, result


@pytest.fixture()
def live_store(published_live_run, tmp_path):
    """Each test's own copy of that store (a LanceDB directory copies as files): what one test publishes,
    the next never sees."""
    original, result = published_live_run
    store_dir = tmp_path / "store"
    shutil.copytree(original, store_dir)
    return store_dir, result


def test_equal_candidate_within_margin_is_published_and_recorded(live_store, llama_dir, task_dir):
    store_dir, live = live_store
    # stage2 from the published vectors with zero rounds rebuilds exactly the live run: equal, margin 0 -> publish
    outcome = recalibrate(str(llama_dir), _source(task_dir), str(store_dir), _settings(0), mode="stage2", margin=0.0)
    a = outcome.attempt
    assert a.decision == "published" and outcome.exit_code == 0, a.reason
    assert a.live_run_id == live.run_id and a.candidate_accuracy == a.live_accuracy == live.summary["accuracy"]
    store = Store(store_dir)
    assert store.published_run_id(TASK) == a.candidate_run_id != live.run_id
    candidate = store.load_run(TASK)
    np.testing.assert_array_equal(candidate.vectors, live.vectors)  # stage 2 reused the published vectors
    (row,) = attempts(store, TASK)
    assert row["decision"] == "published" and row["candidate_run_id"] == a.candidate_run_id
    assert row["live_run_id"] == live.run_id and row["eval_examples"] == 12 and row["mode"] == "stage2"
    assert store.rounds(a.candidate_run_id)[0]["bytes_up"] == [0, 0]  # nothing uploaded in stage 1


def test_worse_candidate_is_refused_with_exit_1_and_live_run_kept(live_store, llama_dir, task_dir):
    store_dir, live = live_store
    # a negative margin demands a gain of one full accuracy point: impossible, so the candidate is "worse"
    args = ["recalibrate", "--model", llama_dir, "--store", store_dir, "--task-dir", task_dir, "--mode", "full"]
    args += ["--margin", "-1", "--clients", 2, "--alpha", 1.0, "--rounds", 1, "--max-train", 32, "--max-test", 12]
    args += ["--min-shard", 4]
    res = CliRunner().invoke(app, [str(x) for x in args])
    assert res.exit_code == 1, res.output
    assert "kept_live" in res.output and "kept the live run" in res.output
    store = Store(store_dir)
    assert store.published_run_id(TASK) == live.run_id
    (row,) = attempts(store, TASK)
    assert row["decision"] == "kept_live" and row["candidate_run_id"] and row["margin"] == -1.0
    assert store.run_row(row["candidate_run_id"])["status"] == "complete"  # kept for audit, not published
    # the metrics read back from the store
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(RecalibrationCollector(str(store_dir), ttl_s=0))
    text = generate_latest(registry).decode()
    assert f'ifedicl_recalibration_attempts_total{{decision="kept_live",task="{TASK}"}} 1.0' in text
    assert f'ifedicl_store_published_run{{run_id="{live.run_id}",task="{TASK}"}} 1.0' in text
    assert f'ifedicl_recalibration_consecutive_failures{{task="{TASK}"}} 0.0' in text


def test_busy_lock_refuses_and_failures_are_recorded(llama_dir, task_dir, tmp_path):
    store_dir = tmp_path / "store"
    with FileLock(str(default_lock_path(str(store_dir), TASK))):
        busy = recalibrate(str(llama_dir), _source(task_dir), str(store_dir), _settings(0), lock_timeout_s=0.2)
    assert busy.attempt.decision == "busy" and busy.exit_code == 3
    # stage2 without a published run fails cleanly, recorded with its reason
    failed = recalibrate(str(llama_dir), _source(task_dir), str(store_dir), _settings(0), mode="stage2")
    assert failed.attempt.decision == "failed" and failed.exit_code == 2
    assert "no published run" in failed.attempt.reason
    store = Store(store_dir)
    assert [r["decision"] for r in attempts(store, TASK)] == ["busy", "failed"]
    assert store.published() == {} and store.runs() == []


def _interval(row) -> tuple[datetime, datetime]:
    m = json.loads(row["metrics"])
    return datetime.fromisoformat(m["lock_acquired_at"]), datetime.fromisoformat(m["lock_released_at"])


def test_two_concurrent_recalibrations_never_both_publish_over_one_live_run(live_store, llama_dir, task_dir, tmp_path):
    """Two pods on one object store: each its own lock (no mutual exclusion), the guardrail on (margin 0).

    Both candidates equal the live run, so both pass the guardrail; what stops the second from
    publishing over a live run it was never compared with is the store's compare-and-set.
    """
    store_dir, live = live_store
    cmd = [sys.executable, "-m", "ifedicl.cli", "recalibrate", "--model", str(llama_dir)]
    cmd += ["--store", str(store_dir), "--task-dir", str(task_dir), "--mode", "stage2", "--rounds", "0"]
    cmd += ["--clients", "2", "--alpha", "1.0", "--max-train", "32", "--max-test", "12", "--min-shard", "4"]
    cmd += ["--margin", "0", "--json"]
    procs = [
        subprocess.Popen([*cmd, "--lock-file", str(tmp_path / f"pod{i}.lock")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), outs
    store = Store(store_dir)
    rows = attempts(store, TASK)
    published = [r for r in rows if r["decision"] == "published"]
    if codes == [0, 2]:  # they overlapped: the loser saw the live run change under it, and published nothing
        (failed,) = [r for r in rows if r["decision"] == "failed"]
        assert "live run changed" in failed["reason"] and failed["live_run_id"] == live.run_id
    # every publication was compared with the run live just before it: a chain from the original live run
    chain = [e["run_id"] for e in store.publication_log(TASK)]
    assert chain[0] == live.run_id and len(chain) == 1 + len(published)
    by_candidate = {r["candidate_run_id"]: r for r in published}
    for before, after in zip(chain, chain[1:]):
        assert by_candidate[after]["live_run_id"] == before
    assert store.published_run_id(TASK) == chain[-1]


def test_a_live_run_changed_during_the_attempt_is_never_overwritten(live_store, llama_dir, task_dir):
    """The compare-and-set alone (no concurrent recalibration): a manual publish mid-attempt wins."""
    from publication_races import complete_run

    store_dir, live = live_store
    other = complete_run(Store(store_dir), 7, task=_source(task_dir).load().task)
    published_meanwhile = []

    def publish_meanwhile(stage, round_index, actors):
        if not published_meanwhile:
            published_meanwhile.append(Store(store_dir).publish(other))

    outcome = recalibrate(
        str(llama_dir), _source(task_dir), str(store_dir), _settings(0), mode="stage2", margin=0.0,
        after_dispatch=publish_meanwhile,
    )  # fmt: skip
    a = outcome.attempt
    assert published_meanwhile and a.decision == "failed" and outcome.exit_code == 2
    assert f"live run changed from {live.run_id} to {other}" in a.reason
    assert Store(store_dir).published_run_id(TASK) == other


def test_guardrail_compares_in_the_serving_dtype(live_store, llama_dir, task_dir):
    """`--serving-dtype bfloat16`: candidate and live are both scored in bfloat16, as the server computes."""
    from ifedicl.serving.reference import ReferenceClassifier

    store_dir, live = live_store
    outcome = recalibrate(
        str(llama_dir), _source(task_dir), str(store_dir), _settings(0), mode="stage2", margin=0.0,
        serving_dtype="bfloat16",
    )  # fmt: skip
    a = outcome.attempt
    assert a.decision == "published", a.reason
    assert a.metrics["compared_in_dtype"] == "bfloat16"
    assert a.metrics["candidate_accuracy_float32"] == live.summary["accuracy"]  # the run's own, kept beside
    # The bfloat16 figures are the HF reference path's in bfloat16 on the same held-out split.
    reference = ReferenceClassifier(str(llama_dir), dtype="bfloat16")
    data = _source(task_dir).load()
    run = reference.load(Store(store_dir), TASK)
    predicted = [p.label for p in reference.classify(data.task, data.test.texts, run)]
    expected = sum(p == data.task.labels[y] for p, y in zip(predicted, data.test.labels)) / len(data.test)
    assert a.candidate_accuracy == pytest.approx(expected) and a.live_accuracy == pytest.approx(expected)
    with pytest.raises(Exception, match="--serving-dtype must be one of"):
        recalibrate(str(llama_dir), _source(task_dir), str(store_dir), _settings(0), mode="stage2", serving_dtype="fp8")


def test_a_recalibration_may_not_drop_the_live_runs_privacy_or_robustness():
    """Recalibrating a DP / secure / robust run without the same flags is refused, naming them (it used to
    drop DP silently); the same or stronger settings pass."""
    from ifedicl.federation_job.options import FederationOptions
    from ifedicl.federation_job.recalibrate import weakened_protections

    protected = FederationOptions(clients=4, min_clients=3, dp_vector_epsilon=2.0, dp_coefficient_epsilon=4.0,
                                  secagg=True)  # fmt: skip
    live = {"method": "ifedicl", **protected.settings(0.5, 0).to_dict()}  # as the run row records it
    plain = FederationOptions(clients=4, min_clients=3).settings(0.5, 0)
    assert weakened_protections(live, plain) == [
        "--dp-vector-epsilon 2 (given: none)", "--dp-coefficient-epsilon 4 (given: none)", "--secagg",
    ]  # fmt: skip
    looser = FederationOptions(clients=4, min_clients=3, dp_vector_epsilon=8.0, dp_coefficient_epsilon=4.0,
                               secagg=True).settings(0.5, 0)  # fmt: skip
    assert weakened_protections(live, looser) == ["--dp-vector-epsilon 2 (given: 8)"]
    assert weakened_protections(live, protected.settings(0.5, 1)) == []
    stronger = FederationOptions(clients=4, min_clients=3, dp_vector_epsilon=1.0, dp_coefficient_epsilon=4.0,
                                 secagg=True).settings(0.5, 0)  # fmt: skip
    assert weakened_protections(live, stronger) == []
    robust = {**FederationOptions(aggregator="median").settings(0.5, 0).to_dict()}
    assert weakened_protections(robust, FederationOptions().settings(0.5, 0)) == ["--aggregator median (given: mean)"]
    assert weakened_protections({}, plain) == []  # a run recorded before these settings existed


def test_the_guardrail_compares_every_protection_setting():
    """Norm screen off or looser, a larger DP δ, fewer clients per masked sum, a lower secure-aggregation
    threshold, a smaller trim: each is weaker."""
    from ifedicl.federation_job.options import FederationOptions
    from ifedicl.federation_job.recalibrate import weakened_protections

    def live(**options) -> dict:
        return FederationOptions(**options).settings(0.5, 0).to_dict()

    def given(**options):
        return FederationOptions(**options).settings(0.5, 0)

    assert weakened_protections(live(), given(reject_norm_factor=0)) == [
        "--reject-norm-factor 10 (given: 0; 0 is off)"
    ]
    assert weakened_protections(live(), given(reject_norm_factor=50)) == [
        "--reject-norm-factor 10 (given: 50; 0 is off)"
    ]
    assert weakened_protections(live(), given(reject_norm_factor=5)) == []  # tighter
    dp = {"dp_coefficient_epsilon": 4.0}
    assert weakened_protections(live(**dp, dp_delta=1e-6), given(**dp, dp_delta=1e-3)) == [
        "--dp-delta 1e-06 (given: 0.001)"
    ]
    assert weakened_protections(live(dp_delta=1e-6), given(dp_delta=1e-3)) == []  # no DP: δ means nothing
    secure = {"secagg": True, "clients": 8}
    assert weakened_protections(live(**secure, min_clients=6), given(**secure, min_clients=3)) == [
        "--min-clients 6 under --secagg (given: 3)"
    ]
    assert weakened_protections(live(**secure, secagg_threshold=0.75), given(**secure, secagg_threshold=0.5)) == [
        "--secagg-threshold 0.75 (given: 0.5)"
    ]
    assert weakened_protections(live(**secure), given(**secure, secagg_threshold=0.75)) == []  # stricter
    trimmed = {"aggregator": "trimmed-mean"}
    assert weakened_protections(live(**trimmed, trim_fraction=0.2), given(**trimmed, trim_fraction=0.1)) == [
        "--trim-fraction 0.2 (given: 0.1)"
    ]


def test_a_weaker_recalibration_runs_only_when_allowed_and_says_what_was_weakened(
    ray_session, llama_dir, task_dir, tmp_path
):
    from ifedicl.federation_job.recalibrate import recalibrate

    store_dir = str(tmp_path / "store")
    screened = dataclasses.replace(_settings(1), reject_norm_factor=5.0)
    first = recalibrate(str(llama_dir), _source(task_dir), store_dir, screened, mode="full", warm_start=False)
    assert first.attempt.decision == "published"
    unscreened = dataclasses.replace(_settings(1), reject_norm_factor=0.0)
    refused = recalibrate(str(llama_dir), _source(task_dir), store_dir, unscreened, mode="stage2")
    assert refused.attempt.decision == "failed" and "--reject-norm-factor 5" in refused.attempt.reason
    allowed = recalibrate(str(llama_dir), _source(task_dir), store_dir, unscreened, mode="stage2", margin=1.0,
                          allow_weaker_protections=True)  # fmt: skip
    assert allowed.attempt.decision == "published"
    assert allowed.attempt.metrics["weakened_protections"] == ["--reject-norm-factor 5 (given: 0; 0 is off)"]


def test_stage2_warm_starts_from_the_live_runs_coefficients_unless_cold(ray_session, llama_dir, task_dir, tmp_path):
    import dataclasses

    from ifedicl.federation_job.recalibrate import _warm_start
    from ifedicl.model_patches.injection import initial_coefficients
    from ifedicl.storage.recalibrations import Attempt

    store_dir = tmp_path / "store"
    live = Federation(str(llama_dir), _source(task_dir), str(store_dir), _settings(1)).run(publish=True)
    initial = initial_coefficients(live.coefficients.shape[0]).numpy()
    assert not np.allclose(live.coefficients, initial)  # one round moved Λ
    store = Store(store_dir)
    for warm, expected in ((True, live.coefficients), (False, initial)):
        outcome = recalibrate(
            str(llama_dir), _source(task_dir), str(store_dir), _settings(0), mode="stage2", margin=1.0, warm_start=warm
        )
        a = outcome.attempt
        assert a.decision == "published", a.reason
        assert a.metrics.get("warm_start_from") == (live.run_id if warm else None)
        start = store.coefficients_by_round(a.candidate_run_id)[0]  # round 0: the Λ stage 2 started from
        np.testing.assert_allclose(start, expected, rtol=0, atol=0)
    # a live run made with another model is never a starting point: cold start, with the reason recorded
    stored = store.load_run(TASK, live.run_id)
    deeper = dataclasses.replace(stored.fingerprint, num_layers=stored.fingerprint.num_layers + 1)
    attempt = Attempt(attempt_id="x", task=TASK, mode="full", margin=0.0)
    other_model = dataclasses.replace(stored, fingerprint=deeper)
    assert _warm_start(attempt, live.run_id, other_model, stored.fingerprint) is None
    assert attempt.metrics["warm_start_from"] is None and "another model" in attempt.metrics["cold_start_reason"]


def test_a_starting_coefficient_tensor_of_the_wrong_shape_is_refused(llama_dir, task_dir, tmp_path):
    from ifedicl.kernel.errors import IfediclError

    with pytest.raises(IfediclError, match="starting Λ must be finite with shape"):
        Federation(str(llama_dir), _source(task_dir), str(tmp_path), _settings(1)).start_from(np.ones((1, 2, 2)))
