"""Data as people have it: the text and label in columns of other names (``--text-field``/``--label-field``),
in every format a client can read (JSONL, CSV, Parquet), a task directory or one file, and in a run config."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ifedicl.cli.run_config import RunConfig
from ifedicl.kernel.errors import DataError
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import TaskSpec

TASK = TaskSpec("sst2", "Review: {text}\nSentiment:", ("negative", "positive"))
ROWS = [("a fine film", 1), ("dull and long", 0), ("loved it", "positive")]


def _write(path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in ROWS))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([("sentence", "y"), *ROWS])
    else:
        pq.write_table(pa.table({"sentence": [t for t, _ in ROWS], "y": [str(y) for _, y in ROWS]}), path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_columns_of_other_names_load_in_every_format_and_are_named_when_missing(tmp_path, fmt):
    task_dir = tmp_path / fmt
    _write(task_dir / f"train.{fmt}", fmt)
    named = DataSource(str(task_dir), "task_dir", TASK, text_field="sentence", label_field="y").load()
    assert named.train.texts == [t for t, _ in ROWS] and named.train.labels == [1, 0, 1]
    one_file = DataSource(str(task_dir / f"train.{fmt}"), "file", TASK, text_field="sentence", label_field="y")
    assert one_file.load().train.labels == [1, 0, 1]
    with pytest.raises(DataError, match="'text'"):  # the default column, named in the error
        DataSource(str(task_dir), "task_dir", TASK).load()


def test_the_flags_reach_the_simulation_and_the_clients_of_a_run_config(tmp_path):
    _write(tmp_path / "org-a" / "train.jsonl", "jsonl")
    config = tmp_path / "orgs.toml"
    config.write_text(
        '[task]\nname = "sst2"\ntemplate = "Review: {text}\\nSentiment:"\nlabels = ["negative", "positive"]\n\n'
        '[[clients]]\nname = "org-a"\ndata = "org-a/train.jsonl"\n'
    )
    (client,) = RunConfig.read(config).population("sentence", "y").clients
    assert client.load(TASK).train.labels == [1, 0, 1]
    # through the CLI: a wrong column name is one line naming the file and the columns it wanted
    cmd = [sys.executable, "-m", "ifedicl.cli", "federate", "--task-dir", str(tmp_path / "org-a"), "--model", "m",
           "--store", str(tmp_path / "s"), "--template", TASK.template, "--labels", "negative,positive",
           "--text-field", "review", "--label-field", "y", "--clients", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "train.jsonl:1: empty or missing text (field 'review')" in proc.stderr
