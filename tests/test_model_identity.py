"""A model is identified by its content, not by where it lies (issue 32): a run made from a local directory
serves from a copy anywhere else, and is refused for another model at the same path; a hub model at
``--revision`` loads that revision's snapshot and the run records the commit it resolved to."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from ifedicl.kernel import model_source
from ifedicl.kernel.model_source import (
    UnknownModelError,
    directory_digest,
    model_identity,
    recorded_identity,
    resolve_model,
    with_revision,
)
from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_config
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage.store import ModelMismatchError, Store

TASK = TaskSpec("sentiment", "Review: {text}\nSentiment:", ("negative", "positive"))


def _fingerprint(path):
    return fingerprint(canonical_model_id(str(path)), load_config(str(path)))


def _store_run(store: Store, path) -> str:
    fp = _fingerprint(path)
    run_id = store.start_run(TASK, fp, settings={})
    store.write_vectors(run_id, TASK.name, np.zeros((fp.num_layers, 2, fp.hidden_size), np.float32))
    store.write_coefficients(run_id, TASK.name, 0, np.ones((fp.num_layers, 2, 2), np.float32))
    store.finish_run(run_id, summary={})
    store.publish(run_id)
    return run_id


def test_a_run_made_from_a_directory_serves_from_a_copy_and_refuses_another_model_there(tmp_path, llama_dir):
    from ifedicl.devkit.tiny_model import build_tiny_model
    from ifedicl.serving.reference import ReferenceClassifier

    data, models = tmp_path / "data" / "m", tmp_path / "models" / "m"
    shutil.copytree(llama_dir, data)
    shutil.copytree(llama_dir, models)
    (models / "README.md").write_text("a model card does not change the model\n")
    identity = recorded_identity(str(data))
    assert identity.startswith("dir@sha256:") and identity == recorded_identity(str(models))
    assert str(data) not in identity and canonical_model_id(str(data)) == str(data.resolve())  # loaded by its path

    store = Store(tmp_path / "store", create=True)
    run_id = _store_run(store, data)  # federated from /data/m
    assert store.load_run(TASK.name, run_id, expect=_fingerprint(models)).run_id == run_id
    classifier = ReferenceClassifier(str(models))  # `ifedicl predict --model /models/m`: the HF serving path
    run = classifier.load(store, TASK.name, None)
    assert run.run_id == run_id and len(classifier.classify(run.task, ["a fine film"], run)) == 1

    shutil.rmtree(models)  # another model (same family and shape, other weights) at the same path
    build_tiny_model(models, ["a fine film", "dull and long"] * 20, "llama", seed=7)
    assert recorded_identity(str(models)) != identity
    with pytest.raises(ModelMismatchError, match=rf"run {run_id} was made with another model \(model_id: run has"):
        store.load_run(TASK.name, run_id, expect=_fingerprint(models))


def test_large_files_are_digested_by_header_and_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(model_source, "WHOLE_FILE_BYTES", 4096)
    monkeypatch.setattr(model_source, "SAMPLE_BYTES", 256)
    model_source._digest.cache_clear()
    weights = {"w": np.arange(40_000, dtype=np.float32)}  # 160 kB: sampled, not read whole
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
        save_file(weights, str(tmp_path / name / "model.safetensors"))
    assert directory_digest(tmp_path / "a") == directory_digest(tmp_path / "b")
    path = tmp_path / "b" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last block is always sampled
    path.write_bytes(bytes(raw))
    assert directory_digest(tmp_path / "a") != directory_digest(tmp_path / "b")  # mtime and size key the cache
    (tmp_path / "a" / "config.json").write_text('{"model_type": "qwen2"}')
    assert recorded_identity(str(tmp_path / "a")) != recorded_identity(str(tmp_path / "b"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, llama_dir):
    """A local HF cache holding acme/tiny at one commit, with ``main`` pointing at it (no network)."""
    import huggingface_hub.constants as hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit


def test_revision_loads_the_snapshot_and_the_run_records_its_commit(hub_cache):
    spec = with_revision("acme/tiny", "main")
    assert spec == "acme/tiny@main" and resolve_model(spec) == str(hub_cache)
    commit = hub_cache.name
    assert model_identity(spec) == f"acme/tiny@{commit}"  # the branch resolved: what the run records
    assert resolve_model(f"acme/tiny@{commit}") == str(hub_cache)  # ... and loads again (actors, serving)
    assert _fingerprint(f"acme/tiny@{commit}").model_id == f"acme/tiny@{commit}"
    assert load_config(spec).num_hidden_layers == 2
    with pytest.raises(UnknownModelError, match="--revision: acme/tiny at revision 'v9' is not in the local HF cache"):
        resolve_model("acme/tiny@v9")


def test_serving_a_hub_id_loads_the_revision_its_runs_were_made_at(tmp_path, hub_cache):
    """`ifedicl predict --model acme/tiny` (no --revision) classifies with the run made at acme/tiny@main: it
    loads the commit the run recorded; the same id at another commit (an unknown one here) is refused."""
    import json
    import os
    import subprocess
    import sys

    store = Store(tmp_path / "store", create=True)
    _store_run(store, "acme/tiny@main")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "ifedicl.cli", "predict", "--store", str(store.uri), "--model", "acme/tiny",
            "--task", TASK.name, "--json", "a fine film"]  # fmt: skip
    proc = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["label"] in TASK.labels
    proc = subprocess.run([*base, "--revision", "v2"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --revision: acme/tiny at revision 'v2'")


def test_revision_is_only_for_hub_ids(tmp_path, llama_dir):
    assert with_revision(str(llama_dir), None) == str(llama_dir)
    for model in (str(llama_dir), "smollm2-135m", str(tmp_path / "m.gguf"), "acme/tiny@v1"):
        with pytest.raises(UnknownModelError, match="--revision: applies to a hub model id"):
            with_revision(model, "main")
    with pytest.raises(UnknownModelError, match="--revision: 'a b' is not a revision"):
        with_revision("acme/tiny", "a b")
