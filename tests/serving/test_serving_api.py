"""The real server (``ifedicl serve`` subprocess) hit by the official ``openai`` client.

One server (``api_server``: Llama, eager, with an API key) over a store holding three
runs written through the Store API and one produced by a real ``ifedicl federate``.
The reload tests run last: they publish new runs into the server's store.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import API_KEY, AUTH, LONG_TEXT, SHORT_TEXTS, TASKS, ifedicl, publish_run, random_run

from ifedicl.kernel.modeling import ModelFingerprint
from ifedicl.storage.store import Store

pytestmark = pytest.mark.vllm

SERVED = ("sst2", "subj", "agnews", "demo-sentiment")
TEXTS = [*SHORT_TEXTS, LONG_TEXT]
TOL = 1e-4


@pytest.fixture(scope="module")
def server_store(api_store) -> str:
    return api_store


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def reference(reference_classifiers, store_uri: str, task: str, texts, run_id: str | None = None):
    ref = reference_classifiers["llama"]
    run = ref.load(Store(store_uri), task, run_id)
    return run.run_id, ref.classify(TASKS[task], texts, run=run)


def metrics(server) -> dict[tuple[str, tuple], float]:
    """``/metrics`` parsed back: {(sample name, sorted labels): value}."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(values: dict, name: str, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_models_list(client, serving_models):
    ids = [m.id for m in client.models.list().data]
    assert str(serving_models["llama"]) in ids
    assert set(SERVED) <= set(ids)


def test_completions_match_predict(client, reference_classifiers, server_store):
    run_id, expected = reference(reference_classifiers, server_store, "sst2", TEXTS)
    response = client.completions.create(model="sst2", prompt=TEXTS, max_tokens=1)
    assert response.system_fingerprint == run_id
    assert [c.text for c in response.choices] == [p.label for p in expected]
    for choice, pred in zip(response.choices, expected):
        probs = choice.model_extra["probabilities"]
        np.testing.assert_allclose(
            [probs[w] for w in TASKS["sst2"].labels],
            [pred.probabilities[w] for w in TASKS["sst2"].labels],
            atol=TOL,
            rtol=0,
        )
        top = choice.logprobs.top_logprobs[0]
        assert set(top) == set(TASKS["sst2"].labels)
        assert abs(np.exp(choice.logprobs.token_logprobs[0]) - probs[choice.text]) < 1e-9
    assert response.usage.completion_tokens == len(TEXTS)


def test_chat_completions_match_predict(client, reference_classifiers, server_store):
    _, expected = reference(reference_classifiers, server_store, "agnews", TEXTS[:2])
    for text, pred in zip(TEXTS[:2], expected):
        response = client.chat.completions.create(model="agnews", messages=[{"role": "user", "content": text}])
        message = response.choices[0].message
        assert message.role == "assistant" and message.content == pred.label
        probs = response.choices[0].model_extra["probabilities"]
        assert max(abs(probs[w] - pred.probabilities[w]) for w in TASKS["agnews"].labels) < TOL
        assert {t.token for t in response.choices[0].logprobs.content[0].top_logprobs} == set(TASKS["agnews"].labels)


def test_classify_matches_predict(client, reference_classifiers, server_store):
    run_id, expected = reference(reference_classifiers, server_store, "subj", TEXTS)
    body = client.post("/classify", cast_to=object, body={"model": "subj", "input": TEXTS})
    assert body["run_id"] == run_id and body["model"] == "subj"
    assert [d["label"] for d in body["data"]] == [p.label for p in expected]
    for row, pred in zip(body["data"], expected):
        assert max(abs(row["probabilities"][w] - pred.probabilities[w]) for w in TASKS["subj"].labels) < TOL
    single = client.post("/classify", cast_to=object, body={"model": "subj", "input": TEXTS[0]})
    assert single["data"][0]["label"] == expected[0].label


def test_federated_run_served_like_predict(client, server_store, serving_models):
    """A run made by `ifedicl federate`, served: labels and probabilities equal `ifedicl predict`."""
    texts = ["the acting was brilliant .", "the ending was dull .", LONG_TEXT]
    out = ifedicl(
        "predict",
        "--store",
        server_store,
        "--model",
        serving_models["llama"],
        "--task",
        "demo-sentiment",
        "--json",
        *texts,
    )
    expected = [json.loads(line) for line in out.splitlines()]
    response = client.completions.create(model="demo-sentiment", prompt=texts)
    assert [c.text for c in response.choices] == [row["label"] for row in expected]
    for choice, row in zip(response.choices, expected):
        probs = choice.model_extra["probabilities"]
        assert max(abs(probs[w] - row["probabilities"][w]) for w in row["probabilities"]) < TOL


def test_base_model_is_plain_vllm(client, serving_models):
    response = client.completions.create(model=str(serving_models["llama"]), prompt="Review: fine", max_tokens=3)
    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.model == str(serving_models["llama"])


def test_bad_input_gets_openai_errors_and_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-task", prompt="hello")
    assert err.value.body["type"] == "NotFoundError" and err.value.body["code"] == 404
    with pytest.raises(openai.NotFoundError):
        client.post("/classify", cast_to=object, body={"model": "no-such-task", "input": ["x"]})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="sst2", prompt="")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="sst2", prompt=["ok", "   "])
    with pytest.raises(openai.BadRequestError):
        client.post("/classify", cast_to=object, body={"model": "sst2"})
    with pytest.raises(openai.BadRequestError):
        client.post("/classify", cast_to=object, body={"model": "sst2", "input": []})
    with pytest.raises(openai.BadRequestError):
        client.post("/classify", cast_to=object, body={"input": ["x"]})
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="sst2", prompt="word " * 2000)
    assert "maximum context length" in str(too_long.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sst2", messages=[{"role": "system", "content": "no user"}])
    raw = httpx.post(
        f"{server.base_url}/v1/classify",
        content=b'{"model": "sst2", "input": [',
        timeout=30,
        headers={"content-type": "application/json", **AUTH},
    )
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError" and "JSON" in error["message"]
    raw = httpx.post(
        f"{server.base_url}/v1/completions",
        content=b"not json",
        timeout=30,
        headers={"content-type": "application/json", **AUTH},
    )
    assert raw.status_code == 400 and raw.json()["error"]["code"] == 400
    # Still serving after all that.
    assert client.completions.create(model="sst2", prompt=TEXTS[0]).choices[0].text in TASKS["sst2"].labels


def test_non_ascii_texts_are_classified_like_predict(client, reference_classifiers, server_store):
    texts = ["naïve café — 日本語", "Ünïcödé ☃ review: a gripping film 🎬"]
    run_id, expected = reference(reference_classifiers, server_store, "sst2", texts)
    body = client.post("/classify", cast_to=object, body={"model": "sst2", "input": texts})
    assert body["run_id"] == run_id and body["usage"]["prompt_tokens"] > 0
    assert [d["label"] for d in body["data"]] == [p.label for p in expected]
    for row, pred in zip(body["data"], expected):
        assert max(abs(row["probabilities"][w] - pred.probabilities[w]) for w in TASKS["sst2"].labels) < TOL


def test_metrics_move(client, server):
    before = metrics(server)
    client.completions.create(model="subj", prompt=TEXTS[:3])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    after = metrics(server)
    key = dict(task="subj", endpoint="completions")
    assert sample(after, "ifedicl_requests_total", **key) == sample(before, "ifedicl_requests_total", **key) + 1
    err = dict(task="_unknown", endpoint="completions", code="404")
    errors = "ifedicl_request_errors_total"
    assert sample(after, errors, **err) == sample(before, errors, **err) + 1
    predicted = sum(
        sample(after, "ifedicl_predictions_total", task="subj", label=w)
        - sample(before, "ifedicl_predictions_total", task="subj", label=w)
        for w in TASKS["subj"].labels
    )
    assert predicted == 3
    count = "ifedicl_classification_latency_seconds_count"  # all tasks in one histogram: no task label
    assert sample(after, count) == sample(before, count) + 1
    per_task = "ifedicl_classifications_total"  # per task: a counter (bounded label cardinality)
    assert sample(after, per_task, task="subj") == sample(before, per_task, task="subj") + 1
    active = {labels: v for (name, labels), v in after.items() if name == "ifedicl_active_run"}
    assert sorted(dict(labels)["task"] for labels in active) == sorted(SERVED)
    assert all(v == 1.0 for v in active.values())
    assert all(sample(after, "ifedicl_published_run_age_seconds", task=t) >= 0 for t in SERVED)
    assert any(name.startswith("vllm:") for name, _ in after)
    assert ("ifedicl_reloads_total", ()) in after and ("ifedicl_reload_failures_total", ()) in after


def admin_reload(server) -> httpx.Response:
    return httpx.post(f"{server.base_url}/admin/reload", timeout=120, headers=AUTH)


def _active_run(server, task: str) -> list[str]:
    values = metrics(server)
    return [
        dict(labels)["run_id"]
        for (name, labels), v in values.items()
        if name == "ifedicl_active_run" and dict(labels)["task"] == task and v == 1.0
    ]


def test_reload_while_streaming(client, server, server_store, serving_models, reference_classifiers):
    """Publish a new sst2 run under load: every answer is exactly one of the two versions; the gauge flips."""
    store = Store(server_store)
    old_run, old_expected = reference(reference_classifiers, server_store, "sst2", TEXTS)
    new_run = publish_run(store, serving_models["llama"], TASKS["sst2"], seed=9001, publish=False)
    _, new_expected = reference(reference_classifiers, server_store, "sst2", TEXTS, run_id=new_run)
    expected = {old_run: old_expected, new_run: new_expected}
    reloads_before = sample(metrics(server), "ifedicl_reloads_total")

    answers: list = []
    failures: list = []
    stop = threading.Event()

    def stream() -> None:
        worker = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                answers.append(worker.completions.create(model="sst2", prompt=TEXTS))
            except Exception as err:  # recorded, asserted below
                failures.append(err)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        while len(answers) < 3:
            time.sleep(0.2)
        store.publish(new_run)
        report = admin_reload(server)  # the poller may have won the race: fine
        assert report.status_code == 200 and report.json()["live"]["sst2"] == new_run
        seen_new = len(answers)
        deadline = time.monotonic() + 120
        while len(answers) < seen_new + 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)

    assert not failures, failures[:3]
    versions = [a.system_fingerprint for a in answers]
    assert set(versions) == {old_run, new_run}
    assert versions[-1] == new_run
    for answer in answers:
        for choice, pred in zip(answer.choices, expected[answer.system_fingerprint]):
            probs = choice.model_extra["probabilities"]
            assert max(abs(probs[w] - pred.probabilities[w]) for w in TASKS["sst2"].labels) < TOL
    assert _active_run(server, "sst2") == [new_run]
    assert sample(metrics(server), "ifedicl_reloads_total") == reloads_before + 1

    # Rollback brings the previous run back, without restarting anything.
    store.rollback("sst2")
    assert admin_reload(server).json()["live"]["sst2"] == old_run
    again = client.completions.create(model="sst2", prompt=TEXTS)
    assert again.system_fingerprint == old_run
    assert [c.text for c in again.choices] == [p.label for p in old_expected]
    assert _active_run(server, "sst2") == [old_run]


def test_bad_runs_are_refused_and_old_stays_live(client, server, server_store, serving_models):
    store = Store(server_store)
    live = _active_run(server, "subj")
    failures_before = sample(metrics(server), "ifedicl_reload_failures_total")
    # A run made with another model (config hash differs) ...
    vectors, coeffs = random_run(2, 128, seed=4242)
    other = ModelFingerprint(str(serving_models["llama"]), 2, 128, "0" * 16)
    mismatched = store.start_run(TASKS["subj"], other, settings={})
    store.write_vectors(mismatched, "subj", vectors)
    store.write_coefficients(mismatched, "subj", 0, coeffs)
    store.finish_run(mismatched, summary={})
    store.publish(mismatched)
    refused = admin_reload(server)
    assert refused.status_code == 409 and "ModelMismatchError" in refused.json()["failed"]["subj"]
    # ... and one with NaN coefficients.
    poisoned = publish_run(store, serving_models["llama"], TASKS["agnews"], seed=77, publish=False)
    bad = coeffs.copy()
    bad[0, 0, 0] = np.nan
    store.write_coefficients(poisoned, "agnews", 1, bad)
    store.publish(poisoned)
    agnews_live = _active_run(server, "agnews")
    refused = admin_reload(server)
    assert refused.status_code == 409 and "NaN" in refused.json()["failed"]["agnews"]
    assert _active_run(server, "subj") == live
    assert _active_run(server, "agnews") == agnews_live
    assert sample(metrics(server), "ifedicl_reload_failures_total") >= failures_before + 2
    assert client.completions.create(model="subj", prompt=TEXTS[0]).system_fingerprint == live[0]
