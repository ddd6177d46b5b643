"""Model sources: GGUF files and named models become one cached HF directory, with the file as identity.

Runs on the real SmolLM2-135M GGUF (pulled from its pinned registry package), converted
into a private cache so the conversion itself is exercised; the shared cache that the
other real-model tests use is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ifedicl.kernel.errors import IfediclError, TaskSpecError
from ifedicl.kernel.gguf_cache import SOURCE_FILE, GgufError, converted_dir, source_of
from ifedicl.kernel.gguf_header import GgufHeaderError, read_header
from ifedicl.kernel.model_catalog import ModelPackageError, pull
from ifedicl.kernel.model_source import UnknownModelError, model_identity, recorded_identity, resolve_model
from ifedicl.kernel.modeling import fingerprint, load_config
from ifedicl.kernel.task import TaskSpec, label_token_ids
from ifedicl.storage.store import ModelMismatchError, Store

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return pull("smollm2-135m")  # offline once installed (make test pulls it first)


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IFEDICL_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _convert_in_subprocess(gguf: Path, cache: Path) -> subprocess.Popen:
    code = "import sys; from ifedicl.kernel.gguf_cache import converted_dir; print(converted_dir(sys.argv[1]))"
    env = {**os.environ, "IFEDICL_HOME": str(cache)}
    return subprocess.Popen([sys.executable, "-c", code, str(gguf)], env=env, stdout=subprocess.PIPE, text=True)


def test_concurrent_conversions_convert_once_and_agree(smollm2_gguf, private_cache):
    procs = [_convert_in_subprocess(smollm2_gguf, private_cache) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    directory = Path(outputs[0])
    # One finished conversion, no staging directory left behind.
    assert sorted(p.name for p in (private_cache / "models").iterdir() if p.is_dir()) == [directory.name]
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= {p.name for p in directory.iterdir()}
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)


def test_every_spelling_of_a_gguf_model_has_one_identity(smollm2_gguf, real_models):
    identity = model_identity("smollm2-135m")
    assert identity.startswith("gguf:SmolLM2-135M-Instruct.Q4_1.gguf@sha256:")
    assert model_identity(str(smollm2_gguf)) == identity
    assert model_identity(str(real_models["smollm2-135m"])) == identity  # the converted directory itself
    assert resolve_model(identity) == str(real_models["smollm2-135m"])  # the id a run recorded loads again
    assert recorded_identity(str(real_models["smollm2-135m"])) == identity  # its file's content, not a dir digest
    assert source_of(real_models["smollm2-135m"]).architecture == "llama"


def test_a_run_made_from_a_gguf_is_refused_for_another_model(tmp_path, real_models, llama_dir):
    store = Store(tmp_path / "store", create=True)
    spec = TaskSpec("subj", "Sentence: {text}\nLabel:", ("objective", "subjective"))
    real = fingerprint(model_identity("smollm2-135m"), load_config("smollm2-135m"))
    run_id = store.start_run(spec, real, settings={})
    store.write_vectors(run_id, spec.name, np.zeros((30, 2, 576), np.float32))
    store.write_coefficients(run_id, spec.name, 0, np.ones((30, 2, 2), np.float32))
    store.finish_run(run_id, summary={})
    assert store.load_run("subj", run_id, expect=real).run_id == run_id
    other = fingerprint(model_identity(str(llama_dir)), load_config(str(llama_dir)))
    with pytest.raises(ModelMismatchError, match="model_id"):
        store.load_run("subj", run_id, expect=other)


def test_bos_follows_the_gguf_rule(real_models):
    from ifedicl.kernel.modeling import load_tokenizer

    smollm2, gemma = load_tokenizer("smollm2-135m"), load_tokenizer("gemma3-270m")
    assert smollm2("The capital").input_ids[0] != smollm2.bos_token_id  # SmolLM2's GGUF: add_bos_token = false
    assert gemma("The capital").input_ids[0] == gemma.bos_token_id  # Gemma's: true (without it Gemma degenerates)


def test_truncated_gguf_is_a_one_line_error_and_leaves_nothing(smollm2_gguf, private_cache, tmp_path):
    truncated = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(smollm2_gguf, "rb") as full, open(truncated, "wb") as out:
        out.write(full.read(5_000_000))
    with pytest.raises(GgufError, match="truncated or corrupt") as err:
        converted_dir(truncated)
    assert "\n" not in str(err.value)
    assert not [p for p in (private_cache / "models").iterdir() if p.is_dir()]


def test_the_header_is_read_without_parsing_the_vocabulary(smollm2_gguf, tmp_path):
    """What conversion reads first (architecture, BOS rule, how long the file must be), from the header alone."""
    header = read_header(smollm2_gguf)
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["tokenizer.ggml.add_bos_token"] is False  # SmolLM2 takes no <bos>
    assert "tokenizer.ggml.tokens" in header.metadata and header.metadata["tokenizer.ggml.tokens"] is None  # skipped
    assert header.tensor_count == 272 and header.data_end == smollm2_gguf.stat().st_size
    cut = tmp_path / "cut.gguf"  # inside the vocabulary, before any tensor info
    cut.write_bytes(smollm2_gguf.read_bytes()[:200_000])
    with pytest.raises(GgufHeaderError, match="cut short"):
        read_header(cut)


def test_unsupported_architecture_and_non_gguf_files(private_cache, tmp_path):
    from gguf import GGUFWriter

    bert = tmp_path / "bert.gguf"
    writer = GGUFWriter(str(bert), "bert")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GgufError, match="architecture 'bert' is not supported"):
        converted_dir(bert)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("{}")
    with pytest.raises(GgufError, match="not a GGUF file"):
        converted_dir(not_gguf)
    assert not [p for p in (private_cache / "models").iterdir() if p.is_dir()]


def test_wrong_hash_and_unknown_names(private_cache, real_models):
    # A corrupted assembled Gemma file in this cache: pull refuses it and names the fix.
    assembled = private_cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assembled.parent.mkdir(parents=True)
    assembled.write_bytes(b"GGUF" + b"\0" * 1000)
    with pytest.raises(ModelPackageError, match="pinned sha256.*--force"):
        pull("gemma3-270m")
    with pytest.raises(ModelPackageError, match="unknown model name 'llama-9000'"):
        pull("llama-9000")
    with pytest.raises(UnknownModelError, match="not a named model"):
        resolve_model("smollm3")


def test_cli_errors_are_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ifedicl.cli", "predict", "--store", str(tmp_path), "--model", "smollm3",
         "--task", "subj", "some text"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: unknown model 'smollm3'")


def test_label_words_the_tokenizer_cannot_spell():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "Sentence": 1, ":": 2, "Label": 3, "x": 4, "objective": 5}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    spec = TaskSpec("subj", "Sentence: {text}\nLabel:", ("objective", "subjective"))
    with pytest.raises(TaskSpecError, match="'subjective'.*unknown to this model's tokenizer"):
        label_token_ids(spec, tokenizer)
    assert issubclass(TaskSpecError, IfediclError)
