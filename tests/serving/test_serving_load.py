"""Serving under load (loopback only, bounded): 1,000 concurrent requests, 200 malformed ones, a publish
and a rollback mid-load. Prints the figures (requests, errors, p50/p99 latency) it measures.

One ``ifedicl serve`` subprocess (Llama, eager) over a store with sst2, subj and agnews published.
Answers under load must equal the answers the same server gave unloaded, one request at a time.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from serving_helpers import LONG_TEXT, SHORT_TEXTS, TASKS, publish_run, published_store, running_server

from ifedicl.storage.store import Store

pytestmark = pytest.mark.vllm

SERVED = ("sst2", "subj", "agnews")
TEXTS = [*SHORT_TEXTS, LONG_TEXT, "an ordinary afternoon", "rates fell and markets rallied"]
TOL = 1e-4


@pytest.fixture(scope="module")
def load_store(tmp_path_factory, serving_models) -> str:
    uri = tmp_path_factory.mktemp("load-store") / "store"
    published_store(uri, serving_models["llama"], SERVED, first_seed=700)
    return str(uri)


@pytest.fixture(scope="module")
def load_server(tmp_path_factory, serving_models, load_store):
    log = tmp_path_factory.mktemp("load-server") / "server.log"
    with running_server(load_store, serving_models["llama"], log, poll_interval=3600.0, extra=["--enforce-eager"]) as p:
        yield p


async def _classify(client: httpx.AsyncClient, task: str, text, timings: list[float] | None = None) -> httpx.Response:
    start = time.perf_counter()
    response = await client.post("/v1/classify", json={"model": task, "input": text})
    if timings is not None:
        timings.append(time.perf_counter() - start)
    return response


def _client(server) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1200, max_keepalive_connections=1200)
    return httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=600)


async def _unloaded(server) -> dict[tuple[str, str], dict]:
    """One request at a time: the reference answer per (task, text), with the run that gave it."""
    out = {}
    async with _client(server) as client:
        for task in SERVED:
            for text in TEXTS:
                body = (await _classify(client, task, text)).raise_for_status().json()
                out[(task, text)] = {"run_id": body["run_id"], **body["data"][0]}
    return out


def _same(answer: dict, expected: dict) -> bool:
    probs, ref = answer["probabilities"], expected["probabilities"]
    return answer["label"] == expected["label"] and max(abs(probs[w] - ref[w]) for w in ref) < TOL


def _p(timings: list[float], q: float) -> float:
    ordered = sorted(timings)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_1000_concurrent_requests_answer_like_unloaded(load_server):
    expected = asyncio.run(_unloaded(load_server))
    rng = random.Random(0)
    jobs = [(rng.choice(SERVED), rng.choice(TEXTS)) for _ in range(1000)]
    timings: list[float] = []

    async def storm():
        async with _client(load_server) as client:
            return await asyncio.gather(*(_classify(client, t, x, timings) for t, x in jobs), return_exceptions=True)

    start = time.perf_counter()
    responses = asyncio.run(storm())
    wall = time.perf_counter() - start
    errors = [r for r in responses if not isinstance(r, httpx.Response) or r.status_code != 200]
    print(
        f"\nload: {len(jobs)} concurrent requests over {len(SERVED)} tasks, {len(errors)} errors, "
        f"{len(jobs) / wall:.1f} req/s, p50 {_p(timings, 0.5):.3f}s, p99 {_p(timings, 0.99):.3f}s"
    )
    assert not errors, errors[:3]
    for (task, text), response in zip(jobs, responses):
        body = response.json()
        assert body["run_id"] == expected[(task, text)]["run_id"]
        assert _same(body["data"][0], expected[(task, text)]), (task, text, body, expected[(task, text)])


def _malformed(i: int) -> tuple[str, dict]:
    """The i-th malformed request: (path, httpx request kwargs), 10 kinds in turn."""
    kinds = [
        ("/v1/classify", {"content": b'{"model": "sst2", "input": ['}),  # truncated JSON
        ("/v1/classify", {"content": b"[1, 2, 3]"}),  # not an object
        ("/v1/classify", {"json": {"input": ["x"]}}),  # no model
        ("/v1/classify", {"json": {"model": f"no-such-task-{i}", "input": ["x"]}}),  # unknown task: 404
        ("/v1/classify", {"json": {"model": "sst2"}}),  # no input
        ("/v1/classify", {"json": {"model": "subj", "input": 42}}),  # wrong type
        ("/v1/classify", {"json": {"model": "agnews", "input": ["fine", "   "]}}),  # blank text
        ("/v1/completions", {"json": {"model": "sst2", "prompt": "word " * 2000}}),  # too long
        ("/v1/chat/completions", {"json": {"model": "subj", "messages": []}}),  # no messages
        ("/v1/completions", {"json": {"model": "sst2", "prompt": "x", "priority": "high"}}),  # bad option
    ]
    return kinds[i % len(kinds)]


def test_200_malformed_requests_get_4xx_while_valid_traffic_continues(load_server):
    expected = asyncio.run(_unloaded(load_server))
    rng = random.Random(1)
    valid = [(rng.choice(SERVED), rng.choice(TEXTS)) for _ in range(300)]

    async def mixed():
        async with _client(load_server) as client:
            bad = [
                client.post(path, headers={"content-type": "application/json"}, **kw)
                for path, kw in map(_malformed, range(200))
            ]
            good = [_classify(client, t, x) for t, x in valid]
            results = await asyncio.gather(*bad, *good, return_exceptions=True)
            return results[:200], results[200:]

    bad, good = asyncio.run(mixed())
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in bad]
    print(f"\nmalformed: {len(bad)} requests, statuses {sorted(set(map(str, statuses)))}; valid alongside: {len(good)}")
    for i, response in enumerate(bad):
        assert isinstance(response, httpx.Response) and 400 <= response.status_code < 500, (i, response)
        error = response.json()["error"]
        assert error["message"] and error["code"] == response.status_code, (i, error)
    for (task, text), response in zip(valid, good):
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
        assert _same(response.json()["data"][0], expected[(task, text)])


def test_publish_and_rollback_under_load_never_mix_versions(
    load_server, load_store, serving_models, reference_classifiers
):
    """Every answer is entirely one version's (each request carries several texts), none fails."""
    store = Store(load_store)
    before = asyncio.run(_unloaded(load_server))
    old_run = before[("sst2", TEXTS[0])]["run_id"]
    new_run = publish_run(store, serving_models["llama"], TASKS["sst2"], seed=9100, publish=False)
    answers: list[httpx.Response] = []
    phases: list[str] = []

    async def traffic(stop: asyncio.Event, client: httpx.AsyncClient):
        while not stop.is_set():
            answers.append(await _classify(client, "sst2", TEXTS))

    async def scenario():
        async with _client(load_server) as client:
            stop = asyncio.Event()
            workers = [asyncio.create_task(traffic(stop, client)) for _ in range(16)]
            while len(answers) < 20:
                await asyncio.sleep(0.05)
            store.publish(new_run)
            reload = await client.post("/admin/reload")
            phases.append(json.dumps(reload.json()["live"]))
            mark = len(answers)
            while len(answers) < mark + 20:
                await asyncio.sleep(0.05)
            store.rollback("sst2")
            reload = await client.post("/admin/reload")
            phases.append(json.dumps(reload.json()["live"]))
            mark = len(answers)
            while len(answers) < mark + 20:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*workers)

    asyncio.run(scenario())
    assert json.loads(phases[0])["sst2"] == new_run and json.loads(phases[1])["sst2"] == old_run
    failed = [a for a in answers if a.status_code != 200]
    assert not failed, [f.text for f in failed[:3]]
    bodies = [a.json() for a in answers]
    versions = [b["run_id"] for b in bodies]
    print(f"\npublish/rollback under load: {len(answers)} requests, versions seen {sorted(set(versions))}")
    assert set(versions) == {old_run, new_run} and versions[-1] == old_run
    after = asyncio.run(_unloaded(load_server))  # old run live again: same answers as before
    assert all(_same(after[k], before[k]) for k in before)
    hf = reference_classifiers["llama"]
    new_ref = hf.classify(TASKS["sst2"], TEXTS, run=hf.load(store, "sst2", new_run))  # the HF reference path
    new_expected = {t: {"label": p.label, "probabilities": p.probabilities} for t, p in zip(TEXTS, new_ref)}
    assert any(not _same(new_expected[t], before[("sst2", t)]) for t in TEXTS)  # the versions really differ
    for body in bodies:  # every text of every answer under the version the answer names
        expected = new_expected if body["run_id"] == new_run else {t: before[("sst2", t)] for t in TEXTS}
        for item, text in zip(body["data"], TEXTS):
            assert _same(item, expected[text]), (body["run_id"], text, item, expected[text])
