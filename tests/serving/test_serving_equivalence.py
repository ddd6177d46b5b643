"""The spine: vLLM with per-request injection equals the HF reference path.

For tiny random Llama, Qwen2 and Gemma 3 models (float32, within 1e-4) and for the
real SmolLM2-135M and Gemma-3-270M weights (float32, within 1e-3), label
probabilities from the real vLLM CPU engine (through the same
ClassificationService the server runs) match ``ReferenceClassifier`` for a mixed
batch of four tasks plus plain requests, with prompts longer than
``max_num_batched_tokens`` (chunked prefill) and prefix caching on. Each
injecting forward runs both ways once: eager on the real SmolLM2 (Llama layout)
and Gemma 3 weights, compiled (the CPU backend's default) on the tiny Llama and
Gemma 3, so the tight tolerance covers compilation. Qwen2 shares Llama's injecting
forward and runs tiny and eager. Every engine costs ~25 s on 2 cores (two
processes each importing vLLM), so no pair of configurations repeats one path.

These engines run their model worker inside the engine-core process (vLLM's uniprocess
executor): the same model classes, kernels, scheduler and ClassificationService, one process
and one vLLM import (~20 core-seconds) fewer per engine. ``ifedicl serve``'s own topology
(front end, engine core, worker process) is what the server tests in this folder run.
"""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest
from serving_helpers import LONG_TEXT, SHORT_TEXTS, TASKS, engine_args, publish_run, start_engine

from ifedicl.kernel.task import label_token_ids
from ifedicl.serving.reference import ReferenceClassifier
from ifedicl.serving.service import ClassificationService
from ifedicl.storage.store import Store

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("model_worker_in_the_engine_core")]

TEXTS = [*SHORT_TEXTS, LONG_TEXT]
PLAIN_TASKS = ("sst2", "agnews")  # scored on the plain model (row 0) in the same batch
TINY_TOL, REAL_TOL = 1e-4, 1e-3

CONFIGS = [
    pytest.param(("llama", False), id="llama-compiled"),
    pytest.param(("qwen2", True), id="qwen2-eager"),
    pytest.param(("gemma3", False), id="gemma3-compiled"),
    pytest.param(("smollm2-135m", True), id="smollm2-135m-real-eager", marks=pytest.mark.real_model),
    pytest.param(("gemma3-270m", True), id="gemma3-270m-real-eager", marks=pytest.mark.real_model),
]


def _matrix(predictions, spec) -> np.ndarray:
    return np.array([[p.probabilities[w] for w in spec.labels] for p in predictions])


def _references(ref: ReferenceClassifier, store_uri: str) -> dict:
    """HF reference probabilities: {(task, injected): [[p per label] per text]}."""
    store = Store(store_uri)
    probs = {}
    for name, spec in TASKS.items():
        probs[(name, True)] = _matrix(ref.classify(spec, TEXTS, run=ref.load(store, name)), spec)
        probs[(name, False)] = _matrix(ref.classify(spec, TEXTS, run=None), spec)
    return probs


@pytest.fixture(scope="module", params=CONFIGS)
def service(request, tmp_path_factory, serving_models, serving_stores, reference_classifiers, loop_thread):
    """(family, tolerance, HF references, a ClassificationService on a real vLLM engine)."""
    family, eager = request.param
    if family in serving_models:
        model, store_uri, tol = serving_models[family], serving_stores[family], TINY_TOL
        ref = reference_classifiers[family]
    else:  # a named real model: resolved (and converted once) through the same path the CLI uses
        model, tol = request.getfixturevalue("real_models")[family], REAL_TOL
        store_uri = str(tmp_path_factory.mktemp(f"store-{family}") / "store")
        store = Store(store_uri, create=True)
        for i, spec in enumerate(TASKS.values()):
            publish_run(store, model, spec, seed=300 + i, scale=0.1)
        ref = ReferenceClassifier(family)
    references = _references(ref, store_uri)
    del ref
    engine = loop_thread.run(start_engine(engine_args(model, enforce_eager=eager)))
    svc = ClassificationService(engine, str(model), store_uri, max_slots=8)
    loop_thread.run(svc.start())
    yield family, tol, references, svc
    engine.shutdown()
    del svc, engine
    gc.collect()


def _scores_matrix(classification, spec) -> np.ndarray:
    return np.array([[s.probabilities[w] for w in spec.labels] for s in classification.scores])


def test_mixed_batch_matches_reference(service, loop_thread):
    family, tol, ref, svc = service
    assert sorted(svc.table.names()) == sorted(TASKS)
    step = svc.engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert max(len(ids) for ids in svc.encode(TASKS["agnews"], TEXTS)) > step  # chunked prefill happens

    async def one_batch():
        injected = [svc.classify(name, TEXTS) for name in TASKS]
        plain = [svc.classify_plain(TASKS[name], TEXTS) for name in PLAIN_TASKS]
        return await asyncio.gather(*injected, *plain)

    # Twice: the second pass reads prompts back from the prefix cache.
    for _ in range(2):
        results = loop_thread.run(one_batch())
        injected, plain = results[: len(TASKS)], results[len(TASKS) :]
        for name, result in zip(TASKS, injected):
            measured = _scores_matrix(result, TASKS[name])
            print(f"{family} {name}: max |vLLM - HF| = {np.max(np.abs(measured - ref[(name, True)])):.2e}")
            np.testing.assert_allclose(measured, ref[(name, True)], atol=tol, rtol=0)
            assert [s.label for s in result.scores] == [
                TASKS[name].labels[int(np.argmax(row))] for row in ref[(name, True)]
            ]
        for name, result in zip(PLAIN_TASKS, plain):
            np.testing.assert_allclose(_scores_matrix(result, TASKS[name]), ref[(name, False)], atol=tol, rtol=0)
    # The injection really changed the scores (the comparison above is not plain vs plain).
    for name in TASKS:
        assert np.max(np.abs(ref[(name, True)] - ref[(name, False)])) > 1e-3


def test_same_prompt_two_tasks_in_one_batch(service, loop_thread):
    """sst2 and mr share a template: same tokens, different runs -> different results, each as if alone."""
    _, tol, _, svc = service

    async def together():
        return await asyncio.gather(svc.classify("sst2", TEXTS), svc.classify("mr", TEXTS))

    both = loop_thread.run(together())
    alone = [loop_thread.run(svc.classify(name, TEXTS)) for name in ("sst2", "mr")]
    for mixed, single, name in zip(both, alone, ("sst2", "mr")):
        np.testing.assert_allclose(
            _scores_matrix(mixed, TASKS[name]), _scores_matrix(single, TASKS[name]), atol=tol, rtol=0
        )
    assert np.max(np.abs(_scores_matrix(both[0], TASKS["sst2"]) - _scores_matrix(both[1], TASKS["mr"]))) > 1e-3


def test_out_of_range_task_row_is_served_plain(service, loop_thread):
    """A request whose ``task_row`` is outside the engine's tables is scored on the plain model, and counted.

    Through the real runner seam and decoder layers: past the end, negative (which would wrap to the
    probe row, β = 0) and huge. Every request has its own cache salt, so none reuses another's KV.
    """
    _, tol, _, svc = service
    spec = TASKS["sst2"]
    ids = svc.encode(spec, TEXTS[:1])[0]
    label_ids = label_token_ids(spec, svc.tokenizer)
    num_rows = svc.probe_row + 1  # row 0, rows 1..max_slots, the probe row
    bad_rows = [num_rows, -1, -num_rows, 2**40]
    injected_row = svc.table.get("sst2").task_row

    async def invalid_count() -> int:
        return sum(info["invalid_task_rows"] for info in await svc._engine_info())

    async def score_all():
        before = await invalid_count()
        rows = [0, injected_row, *bad_rows]
        scored = await asyncio.gather(
            *(svc._label_logprobs(ids, row, f"out-of-range/{i}", label_ids) for i, row in enumerate(rows))
        )
        return scored, await invalid_count() - before

    (plain, injected, *bad), counted = loop_thread.run(score_all())
    assert np.max(np.abs(injected - plain)) > 1e-3  # the comparison below is not plain vs plain
    for row, logprobs in zip(bad_rows, bad):
        np.testing.assert_allclose(logprobs, plain, atol=tol, rtol=0, err_msg=f"task_row {row}")
    assert counted >= len(bad_rows)  # once per request and engine step it was scheduled in
