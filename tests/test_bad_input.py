"""Bad input gets one clear line from the CLI (exit 2, no traceback) and nothing is written."""

import json
import subprocess
import sys

import pytest

from ifedicl.kernel.errors import TaskSpecError
from ifedicl.kernel.modeling import load_tokenizer
from ifedicl.kernel.task import TaskSpec, label_token_ids


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ifedicl.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _assert_clean_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and pattern in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def _task_dir(tmp_path, rows, labels=("negative", "positive")):
    d = tmp_path / "task"
    d.mkdir()
    (d / "task.json").write_text(json.dumps({"name": "t", "template": "Review: {text}\nSentiment:", "labels": labels}))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _federate(task_dir, llama_dir, store):
    return _cli("federate", "--task-dir", task_dir, "--model", llama_dir, "--store", store, "--clients", 2)


def test_unknown_task_dir(tmp_path, llama_dir):
    proc = _federate(tmp_path / "missing", llama_dir, tmp_path / "store")
    _assert_clean_error(proc, "does not exist")
    assert not (tmp_path / "store").exists()


def test_label_outside_label_list(tmp_path, llama_dir):
    d = _task_dir(tmp_path, [{"text": "fine", "label": 0}, {"text": "bad", "label": 5}])
    _assert_clean_error(_federate(d, llama_dir, tmp_path / "store"), "train.jsonl:2: label 5 is outside 0..1")


def test_empty_text(tmp_path, llama_dir):
    d = _task_dir(tmp_path, [{"text": "fine", "label": 0}, {"text": "   ", "label": 1}])
    _assert_clean_error(_federate(d, llama_dir, tmp_path / "store"), "train.jsonl:2: empty or missing text")


def test_labels_sharing_a_first_token(tmp_path, llama_dir):
    tokenizer = load_tokenizer(str(llama_dir))
    with pytest.raises(TaskSpecError, match="share their first token"):
        label_token_ids(TaskSpec("t", "Review: {text}\nSentiment:", ("positive", "positively")), tokenizer)
    rows = [{"text": f"text {i}", "label": i % 2} for i in range(8)]
    d = _task_dir(tmp_path, rows, labels=("positive", "positively"))
    _assert_clean_error(_federate(d, llama_dir, tmp_path / "store"), "share their first token")


def test_predict_against_missing_store_and_unknown_task(tmp_path, llama_dir):
    proc = _cli("predict", "--store", tmp_path / "nostore", "--model", llama_dir, "--task", "t", "hi")
    _assert_clean_error(proc, "does not exist")


def test_predict_without_text(tmp_path, llama_dir):
    (tmp_path / "store").mkdir()
    proc = _cli("predict", "--store", tmp_path / "store", "--model", llama_dir, "--task", "t")
    _assert_clean_error(proc, "no text to classify")


def test_bad_settings(tmp_path, llama_dir, task_dir):
    proc = _cli("federate", "--task-dir", task_dir, "--model", llama_dir, "--store", tmp_path / "s", "--alpha", 0)
    _assert_clean_error(proc, "--alpha must be > 0")
