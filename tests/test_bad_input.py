"""Bad input gets one clear line from the CLI (exit 2, no traceback) and nothing is written."""

import csv
import io
import json
import re
import subprocess
import sys

import pytest

from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.errors import DataError, IfediclError, TaskSpecError
from ifedicl.kernel.modeling import load_tokenizer
from ifedicl.kernel.sources import DataSource
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


# ---------------------------------------------------------------- task.json and data files, at the loaders
# These need no model: they call the loaders the CLI and every client actor use (kernel.data), and one
# `build-model` subprocess shows the CLI turns such an error into one line and exit 2.

_TEMPLATE = "Review: {text}\nSentiment:"


def _write_task(tmp_path, spec: dict, train: str = '{"text": "fine", "label": 0}\n', name: str = "train.jsonl"):
    d = tmp_path / "task"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps(spec), encoding="utf-8")
    (d / name).write_text(train, encoding="utf-8")
    return d


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "t", "template": _TEMPLATE, "labels": ["good", "bad", "good"]}, "duplicate label word 'good'"),
        ({"name": "t", "template": _TEMPLATE, "labels": ["good"]}, "needs at least 2 label words, got ['good']"),
        ({"name": "t", "template": _TEMPLATE, "labels": []}, "needs at least 2 label words, got []"),
        ({"name": "t", "template": "Review: {txt}\nSentiment:", "labels": ["a", "b"]}, "has no {text} slot"),
        (
            {"name": "t", "template": _TEMPLATE, "labels": "neg,pos"},
            "'labels' must be a list of label words, got 'neg,pos'",
        ),
        ({"name": "t", "template": _TEMPLATE, "labels": [0, 1]}, "label word 0 must be a non-empty string"),
        ({"name": "t", "template": _TEMPLATE, "labels": ["a", " "]}, "label word ' ' must be a non-empty string"),
        ({"name": "t", "template": 5, "labels": ["a", "b"]}, "field 'template' must be a string, got 5"),
        ({"name": "t", "labels": ["a", "b"]}, "lacks field template"),
    ],
)
def test_bad_task_json_names_the_file_and_the_value(tmp_path, spec, message):
    d = _write_task(tmp_path, spec)
    with pytest.raises(TaskSpecError) as err:
        load_task_dir(d)
    assert str(err.value).startswith(f"{d / 'task.json'}: "), err.value
    assert message in str(err.value)
    assert isinstance(err.value, IfediclError)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"text": "fine", "label": true}', "train.jsonl:2: label True is a boolean"),
        ('{"text": "fine", "label": false}', "train.jsonl:2: label False is a boolean"),
        ('{"text": "fine", "label": 1.7}', "train.jsonl:2: label 1.7 is a float"),
        # integral floats are refused too (module docstring of kernel.data: a float column is worth a look)
        ('{"text": "fine", "label": 1.0}', "train.jsonl:2: label 1.0 is a float"),
        ('{"text": "fine", "label": null}', "train.jsonl:2: missing label"),
        ('{"text": "fine"}', "train.jsonl:2: missing label"),
        ('{"text": "fine", "label": [1]}', "train.jsonl:2: label [1] is a list"),
        (
            '{"text": "fine", "label": "neutral"}',
            "train.jsonl:2: label 'neutral' is not one of ['negative', 'positive']",
        ),
        ('{"text": "fine", "label": -1}', "train.jsonl:2: label -1 is outside 0..1"),
    ],
)
def test_bad_jsonl_label_names_the_line_and_the_value(tmp_path, row, message):
    d = _write_task(tmp_path, _SPEC, '{"text": "ok", "label": 0}\n' + row + "\n")
    with pytest.raises(DataError, match=re.escape(message)):
        load_task_dir(d)


@pytest.mark.parametrize(
    ("cell", "message"),
    [("1.0", "train.csv:3: label '1.0' is not one of"), ("true", "train.csv:3: label 'true' is not one of")],
)
def test_bad_csv_label_names_the_line_and_the_value(tmp_path, cell, message):
    d = _write_task(tmp_path, _SPEC, f"text,label\nok,0\nfine,{cell}\n", name="train.csv")
    with pytest.raises(DataError, match=re.escape(message)):
        load_task_dir(d)


_SPEC = {"name": "t", "template": _TEMPLATE, "labels": ["negative", "positive"]}


def test_labels_as_indices_words_and_digit_strings_still_load(tmp_path):
    rows = [
        {"text": "a", "label": 0},
        {"text": "b", "label": "positive"},
        {"text": "c", "label": "1"},
        {"text": "d", "label": "negative"},
    ]
    d = _write_task(tmp_path, _SPEC, "".join(json.dumps(r) + "\n" for r in rows))
    assert load_task_dir(d).train.labels == [0, 1, 1, 0]


_NON_ASCII = ["Très bon film, déjà vu ça ?", "ひどい映画だった", "Отличный фильм 👍", "ممتاز", "naïve café – “quoted”"]


@pytest.mark.parametrize("layout", ["jsonl", "jsonl-escaped", "csv", "csv-bom"])
def test_non_ascii_texts_load_unchanged(tmp_path, layout):
    spec = {"name": "t", "template": "Avis : {text}\nSentiment :", "labels": ["négatif", "positif"]}
    labels = [i % 2 for i in range(len(_NON_ASCII))]
    if layout.startswith("jsonl"):
        ensure_ascii = layout == "jsonl-escaped"  # \\u escapes and raw UTF-8 must load the same
        body = "".join(
            json.dumps({"text": t, "label": y}, ensure_ascii=ensure_ascii) + "\n" for t, y in zip(_NON_ASCII, labels)
        )
        d = _write_task(tmp_path, spec, body)
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["text", "label"])
        writer.writerows(zip(_NON_ASCII, ["négatif" if y == 0 else "positif" for y in labels]))
        body = ("\ufeff" if layout == "csv-bom" else "") + buf.getvalue()  # Excel writes a byte-order mark
        d = _write_task(tmp_path, spec, body, name="train.csv")
    data = load_task_dir(d)
    assert data.train.texts == _NON_ASCII
    assert data.train.labels == labels
    assert data.task.labels == ("négatif", "positif")


def test_a_file_that_is_not_utf8_is_a_data_error(tmp_path):
    d = _write_task(tmp_path, _SPEC)
    (d / "train.jsonl").write_bytes('{"text": "déjà", "label": 0}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.jsonl: not UTF-8 text .*save it as UTF-8"):
        load_task_dir(d)


def test_cli_template_and_labels_options_are_checked_too():
    with pytest.raises(TaskSpecError, match=r"--template/--labels: .*duplicate label word 'a'"):
        DataSource.from_options("some/dir", None, template="Q: {text}\nA:", labels="a, b, a")
    with pytest.raises(TaskSpecError, match=r"--template/--labels: .*has no \{text\} slot"):
        DataSource.from_options("some/dir", None, template="Q: {x}\nA:", labels="a,b")


def test_cli_prints_one_error_line_for_a_bad_task_json(tmp_path):
    """The whole path: `build-model` loads the task dir first, so no model is needed to see the error."""
    d = _write_task(tmp_path, {"name": "t", "template": _TEMPLATE, "labels": ["yes", "no", "yes"]})
    proc = _cli("build-model", "--out", tmp_path / "model", "--task-dir", d)
    _assert_clean_error(proc, f"{d / 'task.json'}: task t: duplicate label word 'yes'")
    proc = _cli(
        "build-model",
        "--out",
        tmp_path / "model",
        "--task-dir",
        _write_task(tmp_path / "b", _SPEC, '{"text": "x", "label": true}\n'),
    )
    _assert_clean_error(proc, "train.jsonl:1: label True is a boolean")
    assert not (tmp_path / "model").exists()
