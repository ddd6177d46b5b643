"""Reload by polling alone, an exhausted slot table and a store that vanishes, on a real server.

One ``ifedicl serve`` (tiny Llama, eager) with one task row (``--max-slots 1``), a 1 s poll
and a 1 s wait for a free row, over a store with two published tasks: one is resident, the
other loads on use. No test here calls ``/admin/reload`` except to ask for a reload's report
while the store is gone; everything else must happen through the poller. Tests run in order
and each leaves the store as published as it found it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_helpers import LONG_TEXT, SHORT_TEXTS, TASKS, metric_values, publish_run, published_store, running_server

from ifedicl.storage.store import Store

pytestmark = pytest.mark.vllm

POLL_S = 1.0
SLOT_WAIT_S = 1.0
HOLDERS = 3  # concurrent requests holding the one row while a cold task asks for it
# A reload (read the store, write a row, measure nothing: runs are served in their own dtype)
# takes well under a second on an idle machine; the slack absorbs the other pytest worker on a
# 2-core CI box, not a missed poll. 20 s was once too little on a box at load 7-10 (a background
# job beside the CI); a wait ends as soon as its condition holds, so a wide slack costs nothing.
SLACK_S = 60.0
NAMES = ("sst2", "subj")
TEXTS = SHORT_TEXTS[:2]
TOL = 1e-4


@pytest.fixture(scope="module")
def fault_store(tmp_path_factory, serving_models) -> str:
    uri = tmp_path_factory.mktemp("fault-store") / "store"
    published_store(uri, serving_models["llama"], NAMES, first_seed=700)
    return str(uri)


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, serving_models, fault_store):
    log = tmp_path_factory.mktemp("fault-server") / "server.log"
    extra = ["--enforce-eager", "--slot-wait-seconds", str(SLOT_WAIT_S)]
    with running_server(
        fault_store, serving_models["llama"], log, poll_interval=POLL_S, extra=extra, max_slots=1
    ) as proc:
        yield proc


def models(server) -> dict[str, dict]:
    listing = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"]
    return {m["id"]: m for m in listing if m["id"] in NAMES}


def classify(server, task: str, texts: list[str], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/classify", json={"model": task, "input": texts}, timeout=timeout)


def probs(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["probs"] for row in response.json()["data"]])  # [texts, labels]


def metric(server, name: str, **labels) -> float:
    return metric_values(server.base_url, name).get(tuple(sorted(labels.items())), 0.0)


def engine_requests(server) -> float:
    """Requests the engine is running or has queued (vLLM's own gauges)."""
    return sum(
        sum(metric_values(server.base_url, name).values())
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting")
    )


def wait_until(condition, what: str, timeout: float = POLL_S + SLACK_S) -> float:
    """Seconds until ``condition()`` holds; fails after ``timeout`` (one poll interval plus slack)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - start


def expected(reference_classifiers, store_uri: str, task: str, run_id: str) -> np.ndarray:
    ref = reference_classifiers["llama"]
    predictions = ref.classify(TASKS[task], TEXTS, run=ref.load(Store(store_uri), task, run_id))
    return np.array([[p.probabilities[w] for w in TASKS[task].labels] for p in predictions])


def test_publish_and_rollback_go_live_by_polling(fault_server, fault_store, serving_models, reference_classifiers):
    listing = models(fault_server)
    resident = [name for name, m in listing.items() if m["resident"]]
    assert len(resident) == 1  # one row: the other task waits for its first request
    task = resident[0]
    old_run = listing[task]["run_id"]
    reloads = metric(fault_server, "ifedicl_reloads_total")

    new_run = publish_run(Store(fault_store), serving_models["llama"], TASKS[task], seed=7777)
    took = wait_until(lambda: models(fault_server)[task]["run_id"] == new_run, f"publish of {new_run}")
    answer = classify(fault_server, task, TEXTS)
    assert answer.json()["run_id"] == new_run
    new_expected = expected(reference_classifiers, fault_store, task, new_run)
    np.testing.assert_allclose(probs(answer), new_expected, atol=TOL, rtol=0)
    print(f"publish live after {took:.1f} s (poll every {POLL_S} s)")

    Store(fault_store).rollback(task)
    took = wait_until(lambda: models(fault_server)[task]["run_id"] == old_run, f"rollback to {old_run}")
    answer = classify(fault_server, task, TEXTS)
    assert answer.json()["run_id"] == old_run
    old_expected = expected(reference_classifiers, fault_store, task, old_run)
    np.testing.assert_allclose(probs(answer), old_expected, atol=TOL, rtol=0)
    assert np.max(np.abs(new_expected - old_expected)) > 1e-3  # the two versions are told apart
    assert metric(fault_server, "ifedicl_reloads_total") == reloads + 2
    print(f"rollback live after {took:.1f} s")


def test_every_row_leased_means_a_503_naming_max_slots(fault_server):
    """While requests hold the one row, a non-resident task waits --slot-wait-seconds, then gets a clear 503."""
    listing = models(fault_server)
    busy = next(name for name, m in listing.items() if m["resident"])
    cold = next(name for name, m in listing.items() if not m["resident"])
    # Requests that together hold the row for several seconds (~0.6 s per 100 texts on 2 shared
    # cores): 256 distinct texts each, so the prefix cache cannot shorten them.
    holders = [[f"review {h}.{i}: {LONG_TEXT}" for i in range(256)] for h in range(HOLDERS)]
    errors_before = metric(fault_server, "ifedicl_request_errors_total", task=cold, endpoint="classify", code="503")
    with ThreadPoolExecutor(max_workers=HOLDERS) as pool:
        holding = [
            pool.submit(lambda texts: (classify(fault_server, busy, texts, timeout=600), time.monotonic()), texts)
            for texts in holders
        ]
        # A holder leases the row before its prompts reach the engine: once the engine has requests, it is held.
        wait_until(lambda: engine_requests(fault_server) > 0, "the holders' requests in the engine", timeout=120)
        start = time.monotonic()
        refused = classify(fault_server, cold, TEXTS)
        refused_at = time.monotonic()
        held = [future.result() for future in holding]
    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert "--max-slots" in message and "in-flight" in message and cold in message, message
    assert SLOT_WAIT_S <= refused_at - start < SLOT_WAIT_S + SLACK_S  # it waited, then gave up
    held_until = max(at for _, at in held)
    print(f"refused after {refused_at - start:.2f} s; the row was held {held_until - refused_at:.1f} s longer")
    assert held_until > refused_at, f"the holders finished {refused_at - held_until:.1f} s before the refusal"
    for (response, _), texts in zip(held, holders):
        assert response.status_code == 200 and len(response.json()["data"]) == len(texts)
    assert (
        metric(fault_server, "ifedicl_request_errors_total", task=cold, endpoint="classify", code="503")
        == errors_before + 1
    )
    # Once the row is free, the same request loads the task (evicting the idle one) and succeeds.
    assert classify(fault_server, cold, TEXTS).status_code == 200
    assert models(fault_server)[cold]["resident"]


def test_unreadable_store_keeps_the_old_tables_serving(fault_server, fault_store):
    """The store directory disappears: ifedicl_store_up drops to 0, every task stays listed, the resident one
    answers exactly as before; the store comes back: ifedicl_store_up is 1 again, by polling."""
    listing = models(fault_server)
    task = next(name for name, m in listing.items() if m["resident"])
    before = classify(fault_server, task, TEXTS)
    failures = metric(fault_server, "ifedicl_reload_failures_total")
    assert metric(fault_server, "ifedicl_store_up") == 1.0

    store_dir = Path(fault_store)
    moved = store_dir.with_name(store_dir.name + ".moved")
    os.rename(store_dir, moved)
    try:
        wait_until(lambda: metric(fault_server, "ifedicl_store_up") == 0.0, "ifedicl_store_up to 0")
        assert metric(fault_server, "ifedicl_reload_failures_total") > failures
        report = httpx.post(f"{fault_server.base_url}/admin/reload", timeout=60)
        assert report.status_code == 409 and "_store" in report.json()["failed"], report.text
        assert report.json()["live"] == {name: m["run_id"] for name, m in listing.items()}
        assert {name: m["run_id"] for name, m in models(fault_server).items()} == report.json()["live"]
        during = classify(fault_server, task, TEXTS)
        assert during.json()["run_id"] == before.json()["run_id"]
        np.testing.assert_allclose(probs(during), probs(before), atol=TOL, rtol=0)
    finally:
        os.rename(moved, store_dir)
    wait_until(lambda: metric(fault_server, "ifedicl_store_up") == 1.0, "ifedicl_store_up back to 1")
    assert {name: m["run_id"] for name, m in models(fault_server).items()} == report.json()["live"]
