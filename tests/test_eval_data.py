"""``ifedicl eval`` reads data as federate does: --split/--test-split and --text-field/--label-field reach every
method's data (the in-process methods and the federation's clients alike) and enter the cell hash only when set."""

from __future__ import annotations

import json

from ifedicl.evaluation.settings import EvalSettings
from ifedicl.evaluation.tasks import prepare_task


def _task_dir(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps({
        "name": "reviews", "template": "Review: {text}\nSentiment:", "labels": ["negative", "positive"],
    }))  # fmt: skip

    def write(stem: str, rows: list[tuple[str, int]]) -> None:
        (folder / f"{stem}.jsonl").write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows))

    write("dev", [("fine", 1), ("dull", 0), ("great", 1), ("bad", 0)])
    write("holdout", [("lovely", 1), ("awful", 0)])
    return folder


def test_eval_reads_the_named_splits_and_fields_for_every_method(tmp_path):
    data = {"split": "dev", "test_split": "holdout", "text_field": "sentence", "label_field": "y"}
    task = prepare_task(str(_task_dir(tmp_path)), None, test_size=2, test_seed=0, data=data)
    assert sorted(task.data.train.texts) == ["bad", "dull", "fine", "great"]
    assert sorted(task.test.texts) == ["awful", "lovely"]
    assert (task.source.split, task.source.test_split, task.source.text_field) == ("dev", "holdout", "sentence")
    clients_view = task.source.load()  # what a federated client reads through the same source
    assert sorted(clients_view.train.texts) == sorted(task.data.train.texts)


def test_the_data_settings_enter_the_cell_hash_only_when_set():
    plain = EvalSettings(model="m", tasks=["t"]).cell_hash("ifedicl")
    assert EvalSettings(model="m", tasks=["t"], data={}).cell_hash("ifedicl") == plain
    assert EvalSettings(model="m", tasks=["t"], data={"split": "dev"}).cell_hash("ifedicl") != plain
