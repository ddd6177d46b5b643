"""Shared fixtures: tiny random models (head_dim 64), a demo task directory, one local Ray.

Everything is built on the spot; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from federation_job.data import load_task_dir  # noqa: E402
from federation_job.demo_data import corpus, make_sentiment_dir  # noqa: E402
from federation_job.tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    return make_sentiment_dir(tmp_path_factory.mktemp("task") / "demo-sentiment", n_train=80, n_test=20)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, task_dir) -> dict[str, Path]:
    """One small random model per supported family, sharing a tokenizer corpus."""
    data = load_task_dir(task_dir)
    texts = corpus(data.task, data.train.texts)
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_model(root / family, texts, family, seed=1) for family in ("llama", "qwen2", "gpt2")}


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
