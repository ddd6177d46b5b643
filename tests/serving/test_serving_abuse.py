"""What a hostile caller can send a real ``ifedicl serve``, and what it gets (issue 31).

One server (Llama, eager, prefix caching on, an API key and an admin key, at most 3
requests in flight, 4 inputs per request), hit with the official ``openai`` client,
httpx and raw sockets:

- engine-internal fields (``cache_salt``, ``vllm_xargs.task_row``, ...) are refused on
  every route, so a prefix-cache poisoning sequence (the probe row's KV planted under the
  base model's and a task's salts) leaves the plain model and the task answering exactly
  as the HF reference does;
- requests in flight are capped (429, ``Retry-After``), inputs are capped on the base
  model too, deep or huge JSON is a 400 before it is parsed;
- ``/admin/reload`` takes only the admin key; a non-loopback server without a key warns.

Beneath the HTTP checks, the engine itself is isolated: one in-process engine with
:class:`~ifedicl.serving.guards.EngineIsolation` installed, as ``ifedicl serve`` installs it,
gets the poisoning requests directly (as any route vLLM adds later would pass them on).
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import openai
import pytest
import torch
from serving_helpers import (
    API_KEY,
    AUTH,
    LONG_TEXT,
    TASKS,
    engine_args,
    metric_values,
    published_store,
    running_server,
    start_engine,
)

from ifedicl.serving.guards import EngineIsolation
from ifedicl.serving.process import free_port
from ifedicl.storage.store import Store

pytestmark = pytest.mark.vllm

ADMIN_KEY = "ifedicl-admin-test-key"
MAX_IN_FLIGHT = 3
MAX_INPUTS = 4
MAX_SLOTS = 8
PROBE_ROW = MAX_SLOTS + 1  # the engine's β = 0 row (service.check_injection_live)
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def abuse_store(tmp_path_factory, serving_models) -> str:
    uri = tmp_path_factory.mktemp("abuse-store") / "store"
    published_store(uri, serving_models["llama"], ("sst2", "subj"), first_seed=900)
    return str(uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory, serving_models, abuse_store):
    log = tmp_path_factory.mktemp("abuse-server") / "server.log"
    extra = [
        "--enforce-eager", "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY,
        "--max-requests-in-flight", str(MAX_IN_FLIGHT), "--max-inputs-per-request", str(MAX_INPUTS),
    ]  # fmt: skip
    with running_server(abuse_store, serving_models["llama"], log, max_slots=MAX_SLOTS, extra=extra) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, path: str, body: dict | None = None, content: bytes | None = None, key: str = API_KEY):
    headers = {"content-type": "application/json", "Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.base_url}{path}", json=body, content=content, headers=headers, timeout=120)


def assert_refused(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == status and all(w in error["message"] for w in words), error
    return error


def block_size(server) -> int:
    """The engine's KV block size, from vLLM's ``vllm:cache_config_info``."""
    (labels,) = metric_values(server.base_url, "vllm:cache_config_info")
    return int(dict(labels)["block_size"])


def plain_top_logprobs(reference_classifiers, ids: list[int], k: int = 5) -> dict[int, float]:
    """The plain model's next-token logprobs after ``ids`` on the HF path: the clean answer."""
    with torch.no_grad():
        logits = reference_classifiers["llama"].ctx.model(input_ids=torch.tensor([ids])).logits[0, -1]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    top = torch.topk(logprobs, k)
    return {int(i): float(v) for i, v in zip(top.indices, top.values)}


def test_engine_fields_refused_and_poisoning_leaves_answers_clean(
    server, client, serving_models, abuse_store, reference_classifiers
):
    """The poisoning sequence first (probe row and a task's row, under the base model's and the task's salts, on
    prompts spanning several full KV blocks), then the plain model and the task: both equal the HF reference."""
    base = str(serving_models["llama"])
    block = block_size(server)
    rng = np.random.default_rng(31)
    ids = [int(i) for i in rng.integers(10, 250, size=3 * block + 5)]  # 3 full blocks and a tail, never sent plain
    assert len(ids) < 500, f"block size {block}: the prompt must fit --max-model-len 512"
    text = " ".join([LONG_TEXT] * 3)  # sst2's prompt of it spans full blocks too
    sst2_prompt = TASKS["sst2"].prompt(text)
    sst2_run = Store(abuse_store).load_run("sst2").run_id
    task_salt = f"ifedicl/sst2/{sst2_run}"  # what a task's salt was: derivable from /v1/models
    for prompt in (ids, sst2_prompt):
        for extra, field in (
            ({"vllm_xargs": {"task_row": PROBE_ROW}}, "vllm_xargs.task_row"),
            ({"vllm_xargs": {"task_row": 1}, "cache_salt": task_salt}, "cache_salt"),
            ({"cache_salt": "caller-chosen"}, "cache_salt"),
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model=base, prompt=prompt, max_tokens=1, extra_body=extra)
            assert refused.value.body["param"] == field and "set by this server" in refused.value.body["message"]
    other_routes = [  # vLLM's own routes and ours: the same refusal, naming the field
        ("/v1/chat/completions", {"model": base, "messages": [{"role": "user", "content": text}],
                                  "vllm_xargs": {"task_row": PROBE_ROW}}, "vllm_xargs.task_row"),
        ("/v1/classify", {"model": "sst2", "input": text, "cache_salt": task_salt}, "cache_salt"),
        ("/v1/completions", {"model": "sst2", "prompt": text, "vllm_xargs": {"task_row": 2}}, "vllm_xargs.task_row"),
        ("/v1/responses", {"model": base, "input": text, "vllm_xargs": {"task_row": PROBE_ROW}}, "vllm_xargs.task_row"),
        ("/inference/v1/generate", {"model": base, "token_ids": ids, "cache_salt": task_salt}, "cache_salt"),
        ("/inference/v1/generate", {"model": base, "token_ids": ids,
                                    "sampling_params": {"extra_args": {"task_row": PROBE_ROW}}},
         "sampling_params.extra_args.task_row"),
    ]  # fmt: skip
    for path, body, field in other_routes:
        assert assert_refused(post(server, path, body), 400, "set by this server")["param"] == field, path

    plain = client.completions.create(
        model=base, prompt=ids, max_tokens=1, logprobs=5, extra_body={"return_tokens_as_token_ids": True}
    )
    served = {int(t.removeprefix("token_id:")): lp for t, lp in plain.choices[0].logprobs.top_logprobs[0].items()}
    clean = plain_top_logprobs(reference_classifiers, ids)
    assert next(iter(sorted(served, key=served.get, reverse=True))) == next(iter(clean))
    for token, logprob in clean.items():
        assert abs(served[token] - logprob) < LOGPROB_TOL, (token, served.get(token), logprob)

    ref = reference_classifiers["llama"]
    (expected,) = ref.classify(TASKS["sst2"], [text], run=ref.load(Store(abuse_store), "sst2"))
    answer = client.post("/classify", cast_to=object, body={"model": "sst2", "input": text})
    probs = answer["data"][0]["probabilities"]
    assert max(abs(probs[w] - expected.probabilities[w]) for w in TASKS["sst2"].labels) < 1e-4


def _held_request(server) -> socket.socket:
    """A request that stays in flight: headers and half a declared body sent, the rest never."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = b'{"model": "sst2", "input": "held"}'
    sock.sendall(
        b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:10]
    )
    return sock


def _wait_for_status(server, status: int, timeout: float = 120.0) -> httpx.Response:
    """GET /v1/models (no engine work) until it answers ``status``; the last answer otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{server.base_url}/v1/models", headers=AUTH, timeout=30)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_requests_in_flight_are_capped_with_429(server, client):
    before = metric_values(server.base_url, "ifedicl_request_errors_total")
    held = [_held_request(server) for _ in range(MAX_IN_FLIGHT)]
    try:
        refused = _wait_for_status(server, 429)
        error = assert_refused(refused, 429, "--max-requests-in-flight", str(MAX_IN_FLIGHT))
        assert error["type"] == "RateLimitError" and int(refused.headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="sst2", prompt="refused while full")
        assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200  # probes never count
    finally:
        for sock in held:
            sock.close()
    assert _wait_for_status(server, 200).status_code == 200
    assert client.completions.create(model="sst2", prompt="served again").choices[0].text in TASKS["sst2"].labels
    after = metric_values(server.base_url, "ifedicl_request_errors_total")
    key = (("code", "429"), ("endpoint", "completions"), ("task", "_unknown"))
    assert after.get(key, 0) == before.get(key, 0) + 1


def test_base_model_requests_are_capped_like_tasks(client, serving_models):
    base = str(serving_models["llama"])
    with pytest.raises(openai.BadRequestError) as wide:
        client.completions.create(model=base, prompt=["fine"] * (MAX_INPUTS + 1), max_tokens=1)
    assert wide.value.body["param"] == "prompt" and "--max-inputs-per-request" in wide.value.body["message"]
    with pytest.raises(openai.BadRequestError) as fanned:
        client.completions.create(model=base, prompt="fine", n=MAX_INPUTS + 1, max_tokens=1)
    assert fanned.value.body["param"] == "n"
    conversations = [[{"role": "user", "content": "fine"}]] * (MAX_INPUTS + 1)  # vLLM's batch chat route
    with pytest.raises(openai.BadRequestError) as batch:
        client.post("/chat/completions/batch", cast_to=object, body={"model": base, "messages": conversations})
    assert batch.value.body["param"] == "messages" and "--max-inputs-per-request" in batch.value.body["message"]
    assert len(client.completions.create(model=base, prompt=["fine"] * MAX_INPUTS, max_tokens=1).choices) == 4


def test_deep_or_huge_json_is_a_400_before_parsing(server, serving_models):
    base = str(serving_models["llama"])
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/classify", "/v1/completions", "/v1/responses"):
        assert_refused(post(server, path, content=deep), 400, "nests 100000 levels", "at most 64")
    nested_option = b'{"model": "' + base.encode() + b'", "prompt": "x", "logit_bias": ' + deep + b"}"
    assert_refused(post(server, "/v1/completions", content=nested_option), 400, "levels")
    objects = b'{"model": "sst2", "input": [' + b"{}," * 1_000_000 + b"{}]}"  # 3 MB: under --max-body-bytes
    assert_refused(post(server, "/v1/classify", content=objects), 400, "elements", "at most")
    strings = b'{"model": "sst2", "input": "[[[[ {,,,, inside a string is text"}'
    assert post(server, "/v1/classify", content=strings).status_code == 200


def test_admin_reload_takes_only_the_admin_key(server, client):
    assert_refused(post(server, "/admin/reload"), 401, "--admin-api-key")  # the API key is not enough
    assert post(server, "/admin/reload", key=ADMIN_KEY).status_code == 200
    assert_refused(httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}), 401)
    assert client.models.list().data


def test_non_loopback_without_api_key_warns(server, abuse_store, serving_models):
    """``--host 0.0.0.0`` without a key logs a WARNING at start-up; the keyed loopback server logged none.
    The port is held on 127.0.0.1, so the server stops at its bind, before it could serve anyone."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    with socket.create_server(("127.0.0.1", port)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ifedicl.cli", "serve", "--store", abuse_store, "--model",
             str(serving_models["llama"]), "--host", "0.0.0.0", "--port", str(port), "--enforce-eager",
             "--dtype", "float32", "--max-model-len", "512"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if "NO API KEY" in line:
                    break
        finally:
            proc.kill()
            proc.wait(timeout=60)
    warning = [line for line in lines if "NO API KEY" in line]
    assert warning and warning[0].startswith("WARNING") and "0.0.0.0" in warning[0], "".join(lines[-30:])
    assert "NO API KEY" not in server.log_path.read_text(errors="replace")


async def _top_logprobs(engine, ids: list[int], extra_args: dict | None = None, salt: str | None = None) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=list(ids))
    if salt is not None:
        prompt["cache_salt"] = salt
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, extra_args=extra_args, detokenize=False)
    final = None
    async for output in engine.generate(prompt, params, f"abuse-{uuid.uuid4().hex}"):
        final = output
    return {token: lp.logprob for token, lp in final.outputs[0].logprobs[0].items()}


def test_engine_isolation_holds_past_the_http_checks(loop_thread, serving_models, reference_classifiers):
    """Requests that reach the engine with the probe row and a salt of their choice (no HTTP check on the way)
    plant nothing: the plain answers after them equal the HF reference. The service's own requests, through
    ``isolation.internal``, still compute under their row."""
    args = engine_args(serving_models["llama"], enforce_eager=True, max_slots=MAX_SLOTS)
    engine = loop_thread.run(start_engine(args))
    isolation = internal = None
    try:
        isolation = EngineIsolation()
        isolation.install(engine)
        block = engine.vllm_config.cache_config.block_size
        rng = np.random.default_rng(32)
        for salt in (None, "ifedicl/sst2/some-run", "caller-chosen"):
            ids = [int(i) for i in rng.integers(10, 250, size=3 * block + 5)]
            loop_thread.run(_top_logprobs(engine, ids, {"task_row": PROBE_ROW}, salt))  # the poisoning request
            plain = loop_thread.run(_top_logprobs(engine, ids))
            clean = plain_top_logprobs(reference_classifiers, ids)
            assert max(abs(plain[t] - lp) for t, lp in clean.items()) < LOGPROB_TOL, salt
        assert isolation.stripped == 3
        ids = [int(i) for i in rng.integers(10, 250, size=3 * block + 5)]
        clean = plain_top_logprobs(reference_classifiers, ids)
        internal = isolation.internal(engine)  # the service's view: its row applies, under its own secret salt
        probed = loop_thread.run(_top_logprobs(internal, ids, {"task_row": PROBE_ROW}, "ifedicl/probe/zero"))
        assert max(abs(probed.get(t, -1e9) - lp) for t, lp in clean.items()) > 1.0
        plain = loop_thread.run(_top_logprobs(engine, ids))
        assert max(abs(plain[t] - lp) for t, lp in clean.items()) < LOGPROB_TOL
        assert isolation.stripped == 3
    finally:
        engine.shutdown()
        # the isolation and its internal view hold the engine: freed now, not at interpreter exit, where
        # AsyncLLM.__del__ would call a shutdown whose module globals are gone (a TypeError in the CI log)
        del engine, isolation, internal
        gc.collect()
