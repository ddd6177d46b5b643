"""Helpers shared by the serving tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_config
from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec
from ifedicl.serving.process import ServeProcess, free_port, ready  # noqa: F401 (free_port: used by test modules)
from ifedicl.storage.store import Store

# sst2 and mr share a template on purpose: identical prompts under two tasks are
# exactly where a prefix cache without per-task salt would serve the wrong KV.
TASKS = {name: TaskSpec(name, *KNOWN_TASKS[name]) for name in ("sst2", "mr", "subj", "agnews")}

SHORT_TEXTS = [
    "a gripping, beautifully acted film",
    "dull and far too long",
    "The central bank raised interest rates again.",
    "the team won the final in extra time",
]
LONG_TEXT = " ".join(
    ["the plot wanders from one scene to the next while the actors try their best with a thin script"] * 4
)  # > 64 tokens after templating: prefilled in several chunks


API_KEY = "ifedicl-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Small limits on the shared API server, so limit tests stay cheap.
MAX_INPUTS = 8
MAX_BODY_BYTES = 64 * 1024


def ifedicl(*args) -> str:
    """The project's CLI, as a user runs it."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ifedicl.cli", *map(str, args)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"ifedicl {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def corpus() -> list[str]:
    """Tokenizer training text: every template and label word, so labels get distinct first tokens."""
    lines = []
    for spec in TASKS.values():
        for text in [*SHORT_TEXTS, LONG_TEXT]:
            for label in spec.labels:
                lines.append(spec.demonstration(text, spec.labels.index(label)))
    return lines * 3


def random_run(num_layers: int, hidden: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and Λ of a plausible calibrated run: vectors ~ N(0, scale²), λ ~ 0.1-0.6, β ~ 0.8-1.2."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(0.0, scale, (num_layers, 2, hidden)).astype(np.float32)
    coeffs = np.empty((num_layers, 2, 2), dtype=np.float32)
    coeffs[..., 0] = rng.uniform(0.1, 0.6, (num_layers, 2))
    coeffs[..., 1] = rng.uniform(0.8, 1.2, (num_layers, 2))
    return vectors, coeffs


def publish_run(
    store: Store,
    model_path: Path,
    spec: TaskSpec,
    seed: int,
    publish: bool = True,
    scale: float = 1.0,
    settings: dict | None = None,
    summary: dict | None = None,
) -> str:
    """Write one complete run through the Store API (as the federation driver does)."""
    config = load_config(str(model_path))
    fp = fingerprint(canonical_model_id(str(model_path)), config)
    vectors, coeffs = random_run(fp.num_layers, fp.hidden_size, seed, scale)
    run_id = store.start_run(spec, fp, settings=settings or {"origin": "tests/serving", "seed": seed})
    store.write_vectors(run_id, spec.name, vectors)
    store.write_coefficients(run_id, spec.name, 0, coeffs)
    store.finish_run(run_id, summary=summary or {"seed": seed})
    if publish:
        store.publish(run_id)
    return run_id


def published_store(uri: Path | str, model_path: Path, names: Sequence[str], first_seed: int) -> Store:
    """A new store with one random published run per task of ``names`` (seeds ``first_seed``, +1, ...)."""
    store = Store(uri, create=True)
    for i, name in enumerate(names):
        publish_run(store, model_path, TASKS[name], seed=first_seed + i)
    return store


class LoopThread:
    """An asyncio loop on a background thread: AsyncLLM needs one long-lived loop across tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="serving-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 900.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def engine_args(model_path: Path, *, enforce_eager: bool, max_slots: int = 8, **extra):
    """Engine settings for tests: float32, chunked prefill in 64-token steps, prefix caching on."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from ifedicl.model_patches.vllm_plugin import engine_overrides

    config = load_config(str(model_path))
    settings = dict(
        model=str(model_path),
        dtype="float32",
        max_model_len=512,
        max_num_batched_tokens=64,
        max_num_seqs=32,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        enforce_eager=enforce_eager,
        gpu_memory_utilization=0.3,
        disable_log_stats=True,
        seed=0,
    )
    settings.update(extra)
    return AsyncEngineArgs(**settings, **engine_overrides(config.architectures, max_slots=max_slots))


async def start_engine(args):
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(args)


class ServerProcess(ServeProcess):
    """``ifedicl serve`` with the tests' engine settings: float32, 64-token chunks, prefix caching."""

    def __init__(
        self,
        store: str,
        model: Path,
        log_path: Path,
        poll_interval: float = 1.0,
        extra: list[str] = (),
        max_slots: int = 8,
    ):
        args = [
            "--poll-interval", str(poll_interval), "--max-slots", str(max_slots),
            "--dtype", "float32", "--max-model-len", "512", "--max-num-batched-tokens", "64",
            "--max-num-seqs", "32", "--enable-chunked-prefill", "--enable-prefix-caching", "--seed", "0",
            *extra,
        ]  # fmt: skip
        super().__init__(store, model, log_path, args)


def running_server(store: str, model: Path, log_path: Path, **kwargs) -> AbstractContextManager[ServerProcess]:
    """A ready ``ifedicl serve`` for the duration of the block, stopped afterwards whatever happens."""
    return ready(ServerProcess(store, model, log_path, **kwargs))


def metric_values(base_url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of ``name`` on the server's /metrics, keyed by their sorted label pairs."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out
