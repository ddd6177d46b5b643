"""model="auto" and the dtype a task is served in, on the shared ``api_server`` (``--auto-route``).

Routing accuracy on real tasks needs a real model (bench/serving.py --routing); here, on
a random model, the server's choice must equal an independent computation of the same
rule (last-layer HF block outputs at the text's end, context vectors centred over the
served tasks, nearest by cosine) and the answer must equal classifying under the chosen task.
"""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import API_KEY, AUTH, LONG_TEXT, SHORT_TEXTS, publish_run

from ifedicl.kernel.data import load_task_dir
from ifedicl.storage.store import Store

pytestmark = pytest.mark.vllm

TEXTS = [*SHORT_TEXTS, LONG_TEXT, "what is the capital of France?"]


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def models(server) -> dict[str, dict]:
    listing = httpx.get(f"{server.base_url}/v1/models", headers=AUTH, timeout=60).json()["data"]
    return {m["id"]: m for m in listing}


def expected_routes(reference_classifiers, store_uri: str, served: dict[str, dict], texts) -> list[tuple[str, float]]:
    """The routing rule, computed here with plain numpy on the HF reference model."""
    import torch

    from ifedicl.model_patches.inference import encode

    ref = reference_classifiers["llama"]
    store = Store(store_uri)
    names = sorted(served)
    layers = [ref.ctx.num_layers - 1]  # the last layer
    vectors = np.stack([store.load_run(t, served[t]["run_id"]).vectors[layers] for t in names])  # [T, K/2, 2, d]
    centre = vectors.mean(axis=0)
    out = []
    for text in texts:
        ids, mask = encode(ref.tokenizer, [text + "\n"])
        with torch.no_grad(), ref.ctx.capturing(mask) as captured:
            ref.ctx.forward(ids, mask)
        h = torch.stack([torch.stack(pair) for pair in captured])[layers, :, 0].double().numpy()  # [K/2, 2, d]
        q = (h - centre).reshape(-1, h.shape[-1])
        q /= np.linalg.norm(q, axis=-1, keepdims=True)
        sims = []
        for v in vectors:
            s = (v - centre).reshape(-1, h.shape[-1])
            s /= np.linalg.norm(s, axis=-1, keepdims=True)
            sims.append(float(np.mean(np.sum(q * s, axis=-1))))
        out.append((names[int(np.argmax(sims))], max(sims)))
    return out


def test_auto_routes_by_the_rule_and_classifies_under_the_chosen_task(api_server, api_store, reference_classifiers):
    listing = models(api_server)
    served = {k: v for k, v in listing.items() if v.get("owned_by") == "ifedicl" and k != "auto"}
    assert sorted(listing["auto"]["routes_to"]) == sorted(served)
    response = httpx.post(f"{api_server.base_url}/v1/classify", headers=AUTH, timeout=120,
                          json={"model": "auto", "input": TEXTS})
    response.raise_for_status()
    body = response.json()
    expected = expected_routes(reference_classifiers, api_store, served, TEXTS)
    for row, (task, similarity) in zip(body["data"], expected):
        assert row["task"] == task and abs(row["similarity"] - similarity) < 1e-3
        assert row["run_id"] == served[task]["run_id"]
        direct = httpx.post(f"{api_server.base_url}/v1/classify", headers=AUTH, timeout=120,
                            json={"model": task, "input": TEXTS[row["index"]]}).json()["data"][0]
        assert row["label"] == direct["label"]
        np.testing.assert_allclose(row["probs"], direct["probs"], atol=1e-4, rtol=0)


def test_auto_on_completions_stream_and_errors(client, api_server):
    response = client.completions.create(model="auto", prompt=TEXTS[:2])
    assert all(c.model_extra["task"] in models(api_server) for c in response.choices)
    streamed = list(client.completions.create(model="auto", prompt=TEXTS[:2], stream=True))
    assert [c.text for chunk in streamed for c in chunk.choices if c.text] == [c.text for c in response.choices]
    chat = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": TEXTS[2]}])
    assert chat.choices[0].model_extra["task"] in models(api_server)
    for bad in ({"model": "auto", "input": []}, {"model": "auto", "input": [3]}):
        refused = httpx.post(f"{api_server.base_url}/v1/classify", headers=AUTH, json=bad, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == 400
    text = httpx.get(f"{api_server.base_url}/metrics", timeout=30).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    auto_400 = (("code", "400"), ("endpoint", "classify"), ("task", "_auto"))
    assert samples[("ifedicl_request_errors_total", auto_400)] >= 2
    assert samples[("ifedicl_routing_latency_seconds_count", ())] >= 3


def _accuracy_samples(server) -> dict[tuple[str, str, str], float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return {
        (s.labels["task"], s.labels["dtype"], s.labels["measured"]): s.value
        for f in text_string_to_metric_families(text) for s in f.samples if s.name == "ifedicl_task_accuracy"
    }


def test_runs_served_in_their_dtype_and_rescored_in_another(api_server, api_store, serving_models, task_dir,
                                                            reference_classifiers):
    """A federated run is served in its own dtype (float32) with its own accuracy; a run made in
    bfloat16 is re-scored at load through the float32 engine on its held-out split."""
    store = Store(api_store)
    federated = models(api_server)["demo-sentiment"]
    summary = store.load_run("demo-sentiment", federated["run_id"]).summary
    assert federated["dtype"] == federated["run_dtype"] == "float32"
    assert federated["run_accuracy"] == federated["serving_accuracy"] == summary["accuracy"]
    assert _accuracy_samples(api_server)[("demo-sentiment", "float32", "serving")] == summary["accuracy"]

    data = load_task_dir(task_dir)
    spec = data.task
    settings = {"dtype": "bfloat16", "source": {"location": str(task_dir), "kind": "task_dir", "max_test": 5}}
    summary = {"accuracy": 0.123, "dtype": "bfloat16", "test_examples": 5}
    run_id = publish_run(store, serving_models["llama"], spec, seed=31337, settings=settings, summary=summary)
    try:
        assert httpx.post(f"{api_server.base_url}/admin/reload", headers=AUTH, timeout=300).status_code in (200, 409)
        entry = models(api_server)["demo-sentiment"]
        assert entry["run_id"] == run_id and entry["run_dtype"] == "bfloat16" and entry["dtype"] == "float32"
        ref = reference_classifiers["llama"]
        test = data.test.head(5)
        predicted = ref.classify(spec, test.texts, run=ref.load(store, spec.name, run_id))
        expected = float(np.mean([p.label == spec.labels[g] for p, g in zip(predicted, test.labels)]))
        assert entry["run_accuracy"] == 0.123 and entry["serving_accuracy"] == expected
        assert entry["accuracy_examples"] == 5 and "re-scored in float32" in entry["accuracy_note"]
        samples = _accuracy_samples(api_server)
        assert samples[("demo-sentiment", "bfloat16", "run")] == 0.123
        assert samples[("demo-sentiment", "float32", "serving")] == expected
    finally:
        store.rollback("demo-sentiment")
        httpx.post(f"{api_server.base_url}/admin/reload", headers=AUTH, timeout=300)


def test_engine_dtype_defaults_to_the_runs(api_store, serving_models):
    from ifedicl.serving.launch import parse_engine_args
    from ifedicl.serving.quality import default_serving_dtype

    assert default_serving_dtype(Store(api_store)) == "float32"
    model = str(serving_models["llama"])
    assert parse_engine_args(model, "127.0.0.1", 1, 8, [], run_dtype="float32").dtype == "float32"
    chosen = parse_engine_args(model, "127.0.0.1", 1, 8, ["--dtype", "bfloat16"], run_dtype="float32")
    assert chosen.dtype == "bfloat16"


def test_cpu_engine_computes_on_every_core_unless_told_otherwise(serving_models, monkeypatch):
    """vLLM's CPU default keeps a core for its scheduler (on 2 cores: the model on one); ifedicl serve gives the
    model all of them, as the CPU image does, and leaves an explicit VLLM_CPU_NUM_OF_RESERVED_CPU alone."""
    import os

    from ifedicl.serving.launch import parse_engine_args

    model = str(serving_models["llama"])
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    parse_engine_args(model, "127.0.0.1", 1, 8, [], run_dtype="float32")
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    parse_engine_args(model, "127.0.0.1", 1, 8, [], run_dtype="float32")
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
