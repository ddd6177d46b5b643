"""The spine: vLLM with per-request injection equals the HF reference path.

For tiny random Llama and Qwen2 models (float32), label probabilities from the
real vLLM CPU engine (through the same ClassificationService the server runs)
match ``ReferenceClassifier`` within 1e-4 for a mixed batch of four tasks plus
plain requests, with prompts longer than ``max_num_batched_tokens`` (chunked
prefill) and prefix caching on, both eager and with the CPU backend's default
compilation.
"""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest
from serving_helpers import LONG_TEXT, SHORT_TEXTS, TASKS, engine_args, start_engine

from serving.service import ClassificationService
from storage.store import Store

pytestmark = pytest.mark.vllm

TOL = 1e-4
TEXTS = [*SHORT_TEXTS, LONG_TEXT]
PLAIN_TASKS = ("sst2", "agnews")  # scored on the plain model (row 0) in the same batch

CONFIGS = [
    pytest.param(("llama", True), id="llama-eager"),
    pytest.param(("llama", False), id="llama-compiled"),
    pytest.param(("qwen2", True), id="qwen2-eager"),
    pytest.param(("qwen2", False), id="qwen2-compiled"),
]


@pytest.fixture(scope="session")
def references(reference_classifiers, serving_stores) -> dict[str, dict]:
    """HF reference probabilities per family: {(task, injected): [[p per label] per text]}."""
    out = {}
    for family, ref in reference_classifiers.items():
        store = Store(serving_stores[family])
        probs = {}
        for name, spec in TASKS.items():
            run = ref.load(store, name)
            probs[(name, True)] = _matrix(ref.classify(spec, TEXTS, run=run), spec)
            probs[(name, False)] = _matrix(ref.classify(spec, TEXTS, run=None), spec)
        out[family] = probs
    return out


def _matrix(predictions, spec) -> np.ndarray:
    return np.array([[p.probabilities[w] for w in spec.labels] for p in predictions])


def _scores_matrix(classification, spec) -> np.ndarray:
    return np.array([[s.probabilities[w] for w in spec.labels] for s in classification.scores])


@pytest.fixture(scope="module", params=CONFIGS)
def service(request, serving_models, serving_stores, loop_thread):
    family, eager = request.param
    engine = loop_thread.run(start_engine(engine_args(serving_models[family], enforce_eager=eager)))
    svc = ClassificationService(engine, str(serving_models[family]), serving_stores[family], max_slots=8)
    loop_thread.run(svc.start())
    yield family, svc
    engine.shutdown()
    del svc, engine
    gc.collect()


def test_mixed_batch_matches_reference(service, references, loop_thread):
    family, svc = service
    ref = references[family]
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
            np.testing.assert_allclose(_scores_matrix(result, TASKS[name]), ref[(name, True)], atol=TOL, rtol=0)
            assert [s.label for s in result.scores] == [
                TASKS[name].labels[int(np.argmax(row))] for row in ref[(name, True)]
            ]
        for name, result in zip(PLAIN_TASKS, plain):
            np.testing.assert_allclose(_scores_matrix(result, TASKS[name]), ref[(name, False)], atol=TOL, rtol=0)
    # The injection really changed the scores (the comparison above is not plain vs plain).
    for name in TASKS:
        assert np.max(np.abs(ref[(name, True)] - ref[(name, False)])) > 1e-3


def test_same_prompt_two_tasks_in_one_batch(service, loop_thread):
    """sst2 and mr share a template: same tokens, different runs -> different results, each as if alone."""
    _, svc = service

    async def together():
        return await asyncio.gather(svc.classify("sst2", TEXTS), svc.classify("mr", TEXTS))

    both = loop_thread.run(together())
    alone = [loop_thread.run(svc.classify(name, TEXTS)) for name in ("sst2", "mr")]
    for mixed, single, name in zip(both, alone, ("sst2", "mr")):
        np.testing.assert_allclose(
            _scores_matrix(mixed, TASKS[name]), _scores_matrix(single, TASKS[name]), atol=TOL, rtol=0
        )
    assert np.max(np.abs(_scores_matrix(both[0], TASKS["sst2"]) - _scores_matrix(both[1], TASKS["mr"]))) > 1e-3
