"""Which split is training data and which the held-out test (``--split``/``--test-split``), and integer labels.

An HF dataset dict (a ``save_to_disk`` folder, as the hub's SST-2: integer labels, its test split unlabelled
with -1) and a task directory (splits are file stems) choose their splits the same way; every reader maps an
integer label i to the task's i-th label word, and refuses -1 (unlabelled) and an index out of range by row.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ifedicl.cli.run_config import ConfigError, RunConfig
from ifedicl.kernel.errors import DataError
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import TaskSpec

TASK = TaskSpec("sst2", "Review: {text}\nSentiment:", ("negative", "positive"))


def _jsonl(path, rows, text="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({text: t, "label": y}) + "\n" for t, y in rows))


@pytest.fixture
def sst2_like(tmp_path):
    """A dataset dict as the hub ships SST-2: 0/1 labels in train and validation, -1 throughout test."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.Value("int64")})

    def part(texts, labels):
        return datasets.Dataset.from_dict({"sentence": texts, "label": labels}, features=features)

    folder = tmp_path / "sst2"
    datasets.DatasetDict({
        "train": part(["a fine film", "dull and long", "loved it"], [1, 0, 1]),
        "validation": part(["great", "bad"], [1, 0]),
        "test": part(["unknown one", "unknown two"], [-1, -1]),
    }).save_to_disk(str(folder))  # fmt: skip
    return folder


def _hf(folder, **splits) -> DataSource:
    return DataSource(str(folder), "hf", TASK, text_field="sentence", **splits)


def test_hf_splits_integer_labels_and_the_unlabelled_test_split(sst2_like):
    unlabelled = r"\[test\] row 0: label -1 is outside 0..1: -1 marks an unlabelled row.*--test-split validation"
    with pytest.raises(DataError, match=unlabelled):
        _hf(sst2_like).load()  # the default held-out split is test: unlabelled here, said so (not 0% accuracy)
    data = _hf(sst2_like, test_split="validation").load()
    assert (data.train.labels, data.test.labels, data.test.texts) == ([1, 0, 1], [1, 0], ["great", "bad"])
    swapped = _hf(sst2_like, split="validation", test_split="train").load()
    assert (swapped.train.texts, swapped.test.labels) == (["great", "bad"], [1, 0, 1])
    for splits, flag in (({"split": "dev"}, "--split"), ({"test_split": "dev", "split": "train"}, "--test-split")):
        listed = r"its splits: \['train', 'validation', 'test'\]"
        with pytest.raises(DataError, match=rf"^{flag}: .* has no split 'dev'; {listed}"):
            _hf(sst2_like, **splits).load()


def test_task_directory_splits_are_file_stems(tmp_path):
    _jsonl(tmp_path / "t" / "train.jsonl", [("a fine film", 1), ("dull", "negative")])
    _jsonl(tmp_path / "t" / "dev.jsonl", [("great", 1)])
    with (tmp_path / "t" / "held.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), ("bad", "0")])
    source = DataSource(str(tmp_path / "t"), "task_dir", TASK)
    default = source.load()
    assert (default.train.labels, len(default.test)) == ([1, 0], 0)  # no test file: no held-out split (as before)
    chosen = DataSource(str(tmp_path / "t"), "task_dir", TASK, split="dev", test_split="held").load()
    assert (chosen.train.texts, chosen.test.labels) == (["great"], [0])
    listed = r"its splits: \['dev', 'held', 'train'\]"
    with pytest.raises(DataError, match=rf"^--test-split: .* has no split 'test'.*{listed}"):
        DataSource(str(tmp_path / "t"), "task_dir", TASK, test_split="test").load()
    with pytest.raises(DataError, match="--split: '../x' is not a split name"):
        DataSource.from_options(str(tmp_path / "t"), None, split="../x")


def _write(path, fmt: str, rows) -> str:
    """``rows`` as a ``fmt`` file; where its last row is, as the reader names it."""
    if fmt == "jsonl":
        _jsonl(path, rows)
        return f"train.jsonl:{len(rows)}"
    if fmt == "csv":
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
        return f"train.csv:{len(rows) + 1}"
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), path)
    return f"train.parquet row {len(rows) - 1}"


BAD_LABELS = [(-1, "label -1 is outside 0..1: -1 marks an unlabelled row"), (2, "label 2 is outside 0..1")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize(("label", "expected"), BAD_LABELS)
def test_every_reader_maps_integer_labels_the_same_way(tmp_path, fmt, label, expected):
    path = tmp_path / f"train.{fmt}"
    where = _write(path, fmt, [("good", 1), ("bad", 0), ("odd", label)])
    with pytest.raises(DataError, match=f"{where}: {expected}"):
        DataSource(str(tmp_path), "task_dir", TASK).load()
    _write(path, fmt, [("good", 1), ("bad", 0)])
    data = DataSource(str(tmp_path), "task_dir", TASK).load()
    assert [TASK.labels[i] for i in data.train.labels] == ["positive", "negative"]


def test_a_run_config_chooses_each_clients_splits(tmp_path, sst2_like):
    _jsonl(tmp_path / "org-b" / "train.jsonl", [("nice", 1), ("awful", 0)], text="sentence")
    _jsonl(tmp_path / "org-b" / "dev.jsonl", [("fine", 1)], text="sentence")
    config = tmp_path / "orgs.toml"
    head = '[task]\nname = "sst2"\ntemplate = "Review: {text}\\nSentiment:"\nlabels = ["negative", "positive"]\n'
    config.write_text(
        head + f'[[clients]]\nname = "org-a"\ndata = "{sst2_like}"\ntest_split = "validation"\n'
        '[[clients]]\nname = "org-b"\ndata = "org-b"\ntest_split = "dev"\n'
    )
    org_a, org_b = RunConfig.read(config).population("sentence").clients
    assert org_a.load(TASK).test.labels == [1, 0] and org_b.load(TASK).test.texts == ["fine"]
    # --split/--test-split are every client's default, its own keys win
    (config.parent / "one.toml").write_text(head + '[[clients]]\nname = "org-b"\ndata = "org-b"\n')
    (client,) = RunConfig.read(config.parent / "one.toml").population("sentence", test_split="dev").clients
    assert client.load(TASK).test.texts == ["fine"]
    config.write_text(head + '[[clients]]\nname = "org-c"\ndata = "org-b/train.jsonl"\nsplit = "dev"\n')
    with pytest.raises(ConfigError, match="client 'org-c': split names a split of a task directory or HF dataset"):
        RunConfig.read(config).population()


def test_a_missing_split_on_the_command_line_is_one_line(tmp_path):
    _jsonl(tmp_path / "t" / "train.jsonl", [("nice", 1), ("awful", 0)])
    cmd = [sys.executable, "-m", "ifedicl.cli", "federate", "--task-dir", str(tmp_path / "t"), "--model", "m",
           "--store", str(tmp_path / "s"), "--template", TASK.template, "--labels", "negative,positive",
           "--test-split", "validation", "--clients", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "error: --test-split: " in proc.stderr and "has no split 'validation'" in proc.stderr
    assert "its splits: ['train']" in proc.stderr
