"""Serving fixtures: tiny Llama/Qwen2/Gemma 3 models, stores of published runs, real vLLM engines.

Engines and servers are expensive on 2 cores (15 s eager, ~60 s compiled), so
they are module- or session-scoped and every test in a module shares them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# vLLM's CPU backend on a shared 2-core box: both cores, 1 GB of KV cache per engine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))  # serving_helpers, whatever pytest's import mode

from serving_helpers import (  # noqa: E402
    API_KEY,
    MAX_BODY_BYTES,
    MAX_INPUTS,
    TASKS,
    LoopThread,
    corpus,
    ifedicl,
    publish_run,
    published_store,
    running_server,
)

from ifedicl.devkit.tiny_model import build_tiny_model  # noqa: E402
from ifedicl.storage.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def model_worker_in_the_engine_core() -> Iterator[None]:
    """For a module's in-process engines: vLLM's CPU platform keeps the worker in the engine-core process when
    V1 multiprocessing is off (AsyncLLM still runs the engine core in a process of its own), one process and one
    vLLM import fewer per engine. Restored for the modules after it (``pytestmark`` ``usefixtures`` it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="session")
def serving_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving-models")
    return {
        family: build_tiny_model(root / family, corpus(), family=family, num_layers=2, hidden_size=128, seed=7)
        for family in ("llama", "qwen2", "gemma3")
    }


@pytest.fixture(scope="session")
def serving_stores(tmp_path_factory, serving_models) -> dict[str, str]:
    """One store per model family with every task of TASKS published once."""
    stores = {}
    for family, path in serving_models.items():
        uri = tmp_path_factory.mktemp(f"store-{family}") / "store"
        store = Store(uri, create=True)
        for i, spec in enumerate(TASKS.values()):
            publish_run(store, path, spec, seed=100 * i + len(family))
        stores[family] = str(uri)
    return stores


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def reference_classifiers(serving_models) -> dict:
    """The HF reference path (``ifedicl predict``'s classifier), one per model family, loaded once."""
    from ifedicl.serving.reference import ReferenceClassifier

    return {family: ReferenceClassifier(str(path)) for family, path in serving_models.items()}


@pytest.fixture(scope="session")
def api_store(tmp_path_factory, serving_models, task_dir) -> str:
    """sst2, subj and agnews written through the Store API, demo-sentiment by a real ``ifedicl federate``."""
    uri = tmp_path_factory.mktemp("server-store") / "store"
    published_store(uri, serving_models["llama"], ("sst2", "subj", "agnews"), first_seed=500)
    ifedicl(
        "federate", "--task-dir", task_dir, "--model", serving_models["llama"], "--store", uri,
        "--clients", 2, "--rounds", 1, "--max-test", 5, "--publish",
    )  # fmt: skip
    return str(uri)


@pytest.fixture(scope="session")
def api_server(tmp_path_factory, serving_models, api_store):
    """The one ``ifedicl serve`` (Llama, eager) the API test modules share: an API key, small limits, model="auto"."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    extra = [
        "--enforce-eager", "--api-key", API_KEY, "--auto-route",
        "--max-inputs-per-request", str(MAX_INPUTS), "--max-body-bytes", str(MAX_BODY_BYTES),
    ]  # fmt: skip
    with running_server(api_store, serving_models["llama"], log, poll_interval=2.0, extra=extra) as proc:
        yield proc
