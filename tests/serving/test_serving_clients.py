"""Clients people already have, against the real server (``api_server``: an API key, small limits).

- a classification client written against vLLM's documented ``/classify`` format (plain
  ``requests``, as vLLM's example client does), checked field for field with vLLM's own
  response model;
- the official ``openai`` client's streaming iterator on task models;
- the API key on every route that changes state (and on the rest), probes open;
- request limits and bad input on every new route: 4xx in OpenAI's format, counted, while
  valid traffic keeps being answered.
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import API_KEY, AUTH, LONG_TEXT, MAX_BODY_BYTES, MAX_INPUTS, SHORT_TEXTS, TASKS

from ifedicl.storage.store import Store

pytestmark = pytest.mark.vllm

TEXTS = [*SHORT_TEXTS, LONG_TEXT]
TOL = 1e-4


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def reference(reference_classifiers, store_uri: str, task: str, texts, run_id: str):
    ref = reference_classifiers["llama"]
    return ref.classify(TASKS[task], texts, run=ref.load(Store(store_uri), task, run_id))


def error_counts(server) -> dict[tuple[str, str, str], float]:
    """``ifedicl_request_errors_total`` by (task, endpoint, code), read from the open /metrics."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.base_url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "ifedicl_request_errors_total":
                out[(s.labels["task"], s.labels["endpoint"], s.labels["code"])] = s.value
    return out


def assert_openai_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == status and isinstance(error["message"], str) and error["type"].endswith("Error")
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


# ---------------------------------------------------------------------- 1. vLLM's classify format
def vllm_style_classify(base_url: str, payload: dict, path: str = "/classify") -> dict:
    """What a client written against vLLM's docs does (examples/.../openai_classification_client.py)."""
    response = requests.post(f"{base_url}{path}", json=payload, headers=AUTH, timeout=120)
    response.raise_for_status()
    return response.json()


@pytest.mark.parametrize("path", ["/classify", "/v1/classify"])
def test_vllm_classification_client(api_server, api_store, reference_classifiers, path):
    from vllm.entrypoints.pooling.classify.protocol import ClassificationResponse

    labels = TASKS["subj"].labels
    body = vllm_style_classify(api_server.base_url, {"model": "subj", "input": TEXTS, "user": "u-1"}, path)
    parsed = ClassificationResponse.model_validate(body)  # vLLM's own response model, field for field
    assert parsed.id.startswith("classify-") and parsed.object == "list" and parsed.created > 0
    assert parsed.model == "subj" and [d.index for d in parsed.data] == list(range(len(TEXTS)))
    expected = reference(reference_classifiers, api_store, "subj", TEXTS, body["run_id"])
    for row, raw, pred in zip(parsed.data, body["data"], expected):
        assert row.num_classes == len(labels) and len(row.probs) == len(labels)
        assert row.label == labels[int(np.argmax(row.probs))] == pred.label
        np.testing.assert_allclose(row.probs, [pred.probabilities[w] for w in labels], atol=TOL, rtol=0)
        assert raw["probabilities"] == dict(zip(labels, row.probs))  # our extra, same numbers by word
    assert parsed.usage.prompt_tokens == parsed.usage.total_tokens > 0

    single = vllm_style_classify(api_server.base_url, {"model": "subj", "input": TEXTS[0], "priority": 0}, path)
    assert [d["label"] for d in single["data"]] == [expected[0].label]
    chat = vllm_style_classify(api_server.base_url, {"model": "subj", "messages": [
        {"role": "user", "content": TEXTS[0]}]}, path)  # vLLM's chat form of the request
    assert chat["data"][0]["probs"] == pytest.approx(single["data"][0]["probs"], abs=TOL)


def test_classify_truncate_prompt_tokens(api_server):
    over_long = "word " * 2000
    body = vllm_style_classify(api_server.base_url, {"model": "sst2", "input": [over_long, LONG_TEXT],
                                                     "truncate_prompt_tokens": 24})
    assert body["usage"]["prompt_tokens"] == 48 and len(body["data"]) == 2
    whole = vllm_style_classify(api_server.base_url, {"model": "sst2", "input": over_long,
                                                      "truncate_prompt_tokens": -1})
    assert whole["data"][0]["label"] in TASKS["sst2"].labels and whole["usage"]["prompt_tokens"] == 511


# ---------------------------------------------------------------------- 2. streaming
def test_completion_stream_with_openai_client(client):
    whole = client.completions.create(model="sst2", prompt=TEXTS[:3])
    stream = client.completions.create(model="sst2", prompt=TEXTS[:3], stream=True,
                                       stream_options={"include_usage": True})
    text, finish, usage, ids = {}, {}, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        for choice in chunk.choices:
            text[choice.index] = text.get(choice.index, "") + choice.text
            if choice.logprobs and choice.logprobs.tokens:
                assert set(choice.logprobs.top_logprobs[0]) == set(TASKS["sst2"].labels)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(ids) == 1
    assert [text[i] for i in range(3)] == [c.text for c in whole.choices]
    assert finish == {0: "stop", 1: "stop", 2: "stop"}
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == 3

    plain = list(client.completions.create(model="sst2", prompt=TEXTS[0], stream=True))
    assert all(chunk.usage is None for chunk in plain)
    assert "".join(c.text for chunk in plain for c in chunk.choices) == whole.choices[0].text


def test_chat_stream_with_openai_client(client):
    messages = [{"role": "user", "content": TEXTS[2]}]
    whole = client.chat.completions.create(model="agnews", messages=messages)
    chunks = list(client.chat.completions.create(model="agnews", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, logprobs=True))
    content = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    assert content == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {t.token for t in chunks[0].choices[0].logprobs.content[0].top_logprobs} == set(TASKS["agnews"].labels)
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_is_server_sent_events(api_server):
    with httpx.stream("POST", f"{api_server.base_url}/v1/completions", headers=AUTH, timeout=120,
                      json={"model": "subj", "prompt": "x y z", "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


# ---------------------------------------------------------------------- 3. API key on every route
ROUTES = [
    ("POST", "/v1/completions", {"model": "sst2", "prompt": "fine"}),
    ("POST", "/v1/chat/completions", {"model": "sst2", "messages": [{"role": "user", "content": "fine"}]}),
    ("POST", "/v1/classify", {"model": "sst2", "input": "fine"}),
    ("POST", "/classify", {"model": "sst2", "input": "fine"}),
    ("POST", "/admin/reload", None),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "payload"), ROUTES, ids=[r[1] for r in ROUTES])
def test_api_key_required(api_server, method, path, payload):
    url = f"{api_server.base_url}{path}"
    kinds = {
        "no key": {}, "wrong key": {"Authorization": "Bearer not-the-key"}, "not bearer": {"Authorization": API_KEY}
    }
    for headers in kinds.values():
        refused = httpx.request(method, url, json=payload, headers=headers, timeout=120)
        assert_openai_error(refused, 401, "API key")
    allowed = httpx.request(method, url, json=payload, headers=AUTH, timeout=120)
    # A reload answers 409 when the store holds a refused run (test_serving_api leaves two).
    assert allowed.status_code == 200 or (path == "/admin/reload" and allowed.status_code == 409), allowed.text


def test_probes_stay_open_and_openai_client_sees_401(api_server):
    assert httpx.get(f"{api_server.base_url}/health", timeout=30).status_code == 200
    assert "ifedicl_requests_total" in httpx.get(f"{api_server.base_url}/metrics", timeout=30).text
    wrong = openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model="sst2", prompt="fine")
    assert err.value.status_code == 401 and err.value.body["code"] == 401
    before = error_counts(api_server)
    httpx.post(f"{api_server.base_url}/admin/reload", timeout=30)
    key = ("_unknown", "admin_reload", "401")
    assert error_counts(api_server).get(key, 0) == before.get(key, 0) + 1


# ---------------------------------------------------------------------- 4. limits and bad input
def post(server, path: str, **kwargs) -> httpx.Response:
    headers = {"content-type": "application/json", **AUTH, **kwargs.pop("headers", {})}
    return httpx.post(f"{server.base_url}{path}", headers=headers, timeout=120, **kwargs)


def test_limits(api_server, client):
    for path, field in (("/v1/classify", "input"), ("/classify", "input"), ("/v1/completions", "prompt")):
        too_many = post(api_server, path, json={"model": "sst2", field: ["fine"] * (MAX_INPUTS + 1)})
        assert_openai_error(too_many, 400, f"at most {MAX_INPUTS}")
        at_limit = post(api_server, path, json={"model": "sst2", field: ["fine"] * MAX_INPUTS})
        assert at_limit.status_code == 200
        # 10,000 texts in a body under --max-body-bytes: refused by count, naming the flag, before any work.
        flood = post(api_server, path, json={"model": "sst2", field: ["x"] * 10_000})
        assert_openai_error(flood, 400, "10000 inputs", f"at most {MAX_INPUTS}", "--max-inputs-per-request")
    wide = post(api_server, "/v1/classify", json={"model": "sst2", "input": [SHORT_TEXTS[0]] * 10_000})
    assert_openai_error(wide, 413, "--max-body-bytes")  # 10,000 real texts pass the byte limit first
    big = b'{"model": "sst2", "input": "' + b"a" * MAX_BODY_BYTES + b'"}'
    assert_openai_error(post(api_server, "/v1/classify", content=big), 413, str(MAX_BODY_BYTES))

    def chunked():  # no Content-Length: the guard counts what arrives
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    assert_openai_error(post(api_server, "/classify", content=chunked()), 413, str(MAX_BODY_BYTES))
    assert client.completions.create(model="sst2", prompt="still serving").choices[0].text in TASKS["sst2"].labels


BAD_INPUT = [  # (what, request kwargs, status, what the message must say); each sent to every route below
    ("unknown task", {"json": {"model": "no-such-task", "X": "fine"}}, 404, "does not exist"),
    ("empty input", {"json": {"model": "sst2", "X": []}}, 400, "non-empty"),
    ("blank text", {"json": {"model": "sst2", "X": ["  "]}}, 400, "is empty"),
    ("non-string inputs", {"json": {"model": "sst2", "X": [1, 2]}}, 400, "must be a string"),
    ("not UTF-8", {"content": b'{"model": "sst2", "X": "caf\xe9 \xff\xfe bad"}'}, 400, "not UTF-8"),
    ("over-long prompt", {"json": {"model": "sst2", "X": "word " * 2000}}, 400, "maximum context length"),
    ("too many inputs", {"json": {"model": "sst2", "X": ["fine"] * (MAX_INPUTS + 1)}}, 400, "--max-inputs-per-request"),
    ("bad priority", {"json": {"model": "sst2", "X": "fine", "priority": "high"}}, 400, "'priority'"),
    ("bad truncation", {"json": {"model": "sst2", "X": "fine", "truncate_prompt_tokens": -5}}, 400, "truncate_prompt"),
]
NEW_ROUTES = [("/classify", "input", "classify"), ("/v1/classify", "input", "classify"),
              ("/v1/completions", "prompt", "completions")]


def _with_field(kwargs: dict, field: str, stream: bool) -> dict:
    if "json" in kwargs:
        body = {(field if k == "X" else k): v for k, v in kwargs["json"].items()}
        return {"json": {**body, **({"stream": True} if stream else {})}}
    return {"content": kwargs["content"].replace(b'"X"', f'"{field}"'.encode())}


def test_bad_input_on_new_routes_counted_while_valid_traffic_is_served(api_server, client):
    valid_answers, failures, stop = [], [], threading.Event()

    def valid_traffic() -> None:
        while not stop.is_set():
            try:
                body = post(api_server, "/classify", json={"model": "sst2", "input": ["très bien — 好极了 ☺"]})
                body.raise_for_status()  # non-ASCII text must classify
                valid_answers.append(body.json()["data"][0]["label"])
            except Exception as err:  # asserted below
                failures.append(err)

    before = error_counts(api_server)
    expected: dict[tuple[str, str, str], int] = {}
    thread = threading.Thread(target=valid_traffic)
    thread.start()
    try:
        for path, field, endpoint in NEW_ROUTES:
            for stream in (False, True) if endpoint == "completions" else (False,):
                for what, kwargs, status, says in BAD_INPUT:
                    response = post(api_server, path, **_with_field(kwargs, field, stream))
                    assert_openai_error(response, status, says), (path, what, stream)
                    task = "_unknown" if status == 404 or "content" in kwargs else "sst2"
                    key = (task, endpoint, str(status))
                    expected[key] = expected.get(key, 0) + 1
    finally:
        stop.set()
        thread.join(timeout=120)
    after = error_counts(api_server)
    for key, count in expected.items():
        assert after.get(key, 0) - before.get(key, 0) == count, key
    assert not failures, failures[:3]
    assert valid_answers and set(valid_answers) <= set(TASKS["sst2"].labels)
    assert client.completions.create(model="sst2", prompt="très bien").choices[0].text in TASKS["sst2"].labels
