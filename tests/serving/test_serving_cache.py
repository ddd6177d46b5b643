"""More published tasks than engine rows: the engine's tables as a cache over the store.

One ``ifedicl serve`` (tiny Llama, eager, ``--max-slots 4``) over a store with 12 published
tasks whose answers differ. Under concurrent load over loopback every answer must equal the
HF reference of its own task and version (so no request is ever scored under another task's
tables), tasks must be evicted and loaded again, and concurrent first requests for one task
must load it once.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import numpy as np
import openai
import pytest
from serving_helpers import SHORT_TEXTS, metric_values, publish_run, running_server

from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec
from ifedicl.storage.store import Store

pytestmark = pytest.mark.vllm

NUM_TASKS, SLOTS = 12, 4
TASK_SPECS = [TaskSpec(f"cache{i:02d}", *KNOWN_TASKS["sst2"]) for i in range(NUM_TASKS)]
LABELS = TASK_SPECS[0].labels
TEXTS = SHORT_TEXTS[:3]
TOL = 2e-5  # float32 on both paths: measured differences are ~1e-6
DISTINCT = 25 * TOL  # every two tasks' answers differ by more than this somewhere


@pytest.fixture(scope="module")
def cache_store(tmp_path_factory, serving_models) -> str:
    uri = tmp_path_factory.mktemp("cache-store") / "store"
    store = Store(uri, create=True)
    for i, spec in enumerate(TASK_SPECS):
        publish_run(store, serving_models["llama"], spec, seed=900 + i, scale=2.0)
    store.optimize()
    return str(uri)


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory, serving_models, cache_store):
    log = tmp_path_factory.mktemp("cache-server") / "server.log"
    with running_server(
        cache_store, serving_models["llama"], log, poll_interval=1.0, extra=["--enforce-eager"], max_slots=SLOTS
    ) as proc:
        yield proc


def expected(reference_classifiers, store_uri: str, task: str, run_id: str | None = None) -> np.ndarray:
    """The HF reference's probabilities [texts, labels] for ``task``'s published (or given) run."""
    ref = reference_classifiers["llama"]
    spec = next(s for s in TASK_SPECS if s.name == task)
    predictions = ref.classify(spec, TEXTS, run=ref.load(Store(store_uri), task, run_id))
    return np.array([[p.probabilities[w] for w in LABELS] for p in predictions])


@pytest.fixture(scope="module")
def references(reference_classifiers, cache_store) -> dict[str, np.ndarray]:
    out = {spec.name: expected(reference_classifiers, cache_store, spec.name) for spec in TASK_SPECS}
    names = sorted(out)
    for i, a in enumerate(names):  # otherwise a request scored under the wrong tables could pass
        for b in names[i + 1 :]:
            assert np.max(np.abs(out[a] - out[b])) > DISTINCT, (a, b)
    return out


def served(server) -> dict[str, dict]:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    return {m.id: m.model_dump() for m in client.models.list().data if m.id.startswith("cache")}


def loads(server) -> float:
    return metric_values(server.base_url, "ifedicl_task_loads_total").get((("reason", "request"),), 0.0)


def evictions(server) -> float:
    return sum(metric_values(server.base_url, "ifedicl_task_evictions_total").values())


async def classify_all(server, tasks: list[str]) -> list[dict]:
    """One /v1/classify request per task, all in flight at once."""
    limits = httpx.Limits(max_connections=len(tasks), max_keepalive_connections=len(tasks))
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=300) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/classify", json={"model": task, "input": TEXTS}) for task in tasks)
        )
    for response in responses:
        assert response.status_code == 200, response.text
    return [response.json() for response in responses]


def assert_answers(bodies: list[dict], tasks: list[str], references: dict[str, np.ndarray]) -> None:
    for task, body in zip(tasks, bodies):
        assert body["model"] == task
        got = np.array([row["probs"] for row in body["data"]])
        np.testing.assert_allclose(got, references[task], atol=TOL, rtol=0, err_msg=task)


def test_all_tasks_served_from_few_slots(cache_server, references):
    listing = served(cache_server)
    assert sorted(listing) == sorted(references)  # every published task is listed, resident or not
    assert 0 < sum(m["resident"] for m in listing.values()) <= SLOTS
    slots = metric_values(cache_server.base_url, "ifedicl_task_slots")
    assert list(slots.values()) == [SLOTS]


def test_every_answer_uses_its_own_tasks_tables_under_concurrent_load(cache_server, references):
    evictions_before = evictions(cache_server)
    before = loads(cache_server)
    rng = random.Random(0)
    tasks = [spec.name for spec in TASK_SPECS] * 4
    rng.shuffle(tasks)
    for wave in range(0, len(tasks), 16):  # 16 requests in flight, 3 texts each, over 12 tasks and 4 rows
        batch = tasks[wave : wave + 16]
        assert_answers(asyncio.run(classify_all(cache_server, batch)), batch, references)
    assert loads(cache_server) - before >= NUM_TASKS - SLOTS  # tasks were loaded on demand ...
    assert evictions(cache_server) > evictions_before  # ... and evicted
    resident = metric_values(cache_server.base_url, "ifedicl_resident_tasks")
    assert 0 < list(resident.values())[0] <= SLOTS
    histogram = metric_values(cache_server.base_url, "ifedicl_task_load_seconds_count")
    assert list(histogram.values())[0] >= loads(cache_server)


def test_concurrent_first_requests_load_a_task_once(cache_server, references):
    cold = next(name for name, m in sorted(served(cache_server).items()) if not m["resident"])
    before = loads(cache_server)
    bodies = asyncio.run(classify_all(cache_server, [cold] * 8))
    assert_answers(bodies, [cold] * 8, references)
    assert loads(cache_server) - before == 1
    assert served(cache_server)[cold]["resident"]


def test_publish_and_rollback_of_an_evicted_task(cache_server, cache_store, serving_models, references,
                                                 reference_classifiers):  # fmt: skip
    listing = served(cache_server)
    name = next(n for n, m in sorted(listing.items()) if not m["resident"])
    spec = next(s for s in TASK_SPECS if s.name == name)
    old_run = listing[name]["run_id"]
    new_run = publish_run(Store(cache_store), serving_models["llama"], spec, seed=990, scale=2.0)
    new_expected = expected(reference_classifiers, cache_store, name, new_run)
    assert np.max(np.abs(new_expected - references[name])) > DISTINCT
    wait_for_run(cache_server, name, new_run)
    assert_answers(asyncio.run(classify_all(cache_server, [name])), [name], {name: new_expected})
    Store(cache_store).rollback(name)
    wait_for_run(cache_server, name, old_run)
    assert_answers(asyncio.run(classify_all(cache_server, [name])), [name], references)


def wait_for_run(server, task: str, run_id: str, timeout: float = 30.0) -> None:
    """Until the poller (1 s) serves ``run_id`` for ``task``; no admin call."""
    deadline = time.monotonic() + timeout
    while served(server)[task]["run_id"] != run_id:
        assert time.monotonic() < deadline, f"{task} still serves {served(server)[task]['run_id']}, not {run_id}"
        time.sleep(0.5)
