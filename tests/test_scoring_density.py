"""Sparser scoring for a grid that must finish (issue 33): federated cells scored at doubling rounds, per-client
methods scored each on its own slice of the test set. Same numbers measured, fewer forward passes."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from ifedicl.evaluation.per_client import client_test_indices, per_client_cell
from ifedicl.evaluation.runner import evaluate
from ifedicl.evaluation.settings import METHODS, EvalSettings, rounds_to_score, scored_rounds
from ifedicl.kernel.data import Split


def test_doubling_rounds_keep_the_start_the_powers_of_two_and_the_last():
    assert scored_rounds(list(range(13)), "doubling") == [0, 1, 2, 4, 8, 12]
    assert scored_rounds(list(range(9)), "doubling") == [0, 1, 2, 4, 8]
    assert scored_rounds([0, 1, 2, 3, 4, 5, 6], "doubling") == [0, 1, 2, 4, 6]  # an early stop at round 6
    assert scored_rounds(list(range(13)), "every") == list(range(13))


def test_client_slices_partition_the_test_set_class_balanced():
    labels = [i % 3 for i in range(47)]
    test = Split([f"t{i}" for i in range(47)], labels)
    slices = client_test_indices(test, 10, "split")
    flat = sorted(i for s in slices for i in s)
    assert flat == list(range(47))  # every example scored once, by exactly one client
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1
    for rows in slices:  # 4-5 examples over 3 classes: every class present
        assert len({labels[i] for i in rows}) == 3
    assert client_test_indices(test, 4, "full") == [list(range(47))] * 4


def test_a_split_cell_pools_the_clients_predictions():
    labels = [0, 1] * 10
    test = Split([f"t{i}" for i in range(20)], labels)
    slices = client_test_indices(test, 2, "split")
    # client 0 right on its whole slice, client 1 always says class 0 (right on half)
    predictions = [[labels[i] for i in slices[0]], [0 for _ in slices[1]]]
    per_client = [
        {"client": c, "accuracy": float(np.mean([p == labels[i] for p, i in zip(predictions[c], slices[c])])),
         "macro_f1": 0.0, "predictions": predictions[c]}
        for c in range(2)
    ]  # fmt: skip
    cell = per_client_cell(per_client, test, slices, num_classes=2)
    assert cell["accuracy"] == pytest.approx(0.75)  # 15 of 20 pooled = the clients' mean (1.0 + 0.5) / 2
    assert cell["client_test"] == "split"
    assert [c["test_examples"] for c in cell["per_client"]] == [10, 10]
    assert all("predictions" not in c for c in cell["per_client"])
    # the spread of 1.0 and 0.5 (0.25) less the slices' sampling variance (0.25·0.5·0.5/9 on average)
    assert cell["client_accuracy_std"] == pytest.approx(np.sqrt(0.0625 - 0.25 / 9 / 2), rel=1e-6)
    # macro-F1 of the pooled predictions: class 0 P=10/15 R=1, class 1 P=1 R=0.5
    assert cell["macro_f1"] == pytest.approx((2 * 10 / 25 + 2 * 5 / 15) / 2)


def test_the_scoring_density_enters_only_the_hashes_of_the_methods_that_read_it():
    full = EvalSettings(model="m", tasks=["t"])
    sparse = EvalSettings(model="m", tasks=["t"], scored_rounds="doubling", client_test="split")
    changed = {m for m in METHODS if full.cell_hash(m) != sparse.cell_hash(m)}
    assert changed == {"local_icl", "local_calibration", "fedavg_lora", "ifedicl"}
    only_rounds = EvalSettings(model="m", tasks=["t"], scored_rounds="doubling")
    assert {m for m in METHODS if full.cell_hash(m) != only_rounds.cell_hash(m)} == {"fedavg_lora", "ifedicl"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scored_rounds": "some"}, "scored_rounds must be one of"),
        ({"client_test": "half"}, "client_test must be one of"),
        ({"client_test": "split", "test_size": 5, "clients": 10}, "--test-size must be >= --clients"),
    ],
)
def test_bad_scoring_densities_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        EvalSettings(model="m", tasks=["t"], **fields).validate()


def test_a_sparse_run_scores_the_doubling_rounds_and_each_client_on_its_slice(
    ray_session, llama_dir, task_dir, tmp_path
):
    settings = EvalSettings(
        model=str(llama_dir), tasks=[str(task_dir)], clients=3, alphas=[1.0], rounds=4, local_epochs=0.25,
        seeds=[0], test_size=12, shots=2, max_train=36, min_shard=4, batch_size=8,
        methods=["local_icl", "local_calibration", "ifedicl"], scored_rounds="doubling", client_test="split",
    )  # fmt: skip
    results = evaluate(settings, tmp_path)
    cells = {c["method"]: c for c in results["cells"]}
    assert [p["round"] for p in cells["ifedicl"]["per_round"]] == [0, 1, 2, 4]
    by_round = cells["ifedicl"]["coefficients_by_round"]  # every round's Λ, round 3 too: scorable later
    assert sorted(by_round, key=int) == ["0", "1", "2", "3", "4"]
    assert by_round["4"] == cells["ifedicl"]["coefficients"] and by_round["3"] != by_round["4"]
    # the second-order round's trust region per round, scored or not: why Λ moved as far as it did
    assert [t["round"] for t in cells["ifedicl"]["trust_region_by_round"]] == [1, 2, 3, 4]
    assert cells["ifedicl"]["accuracy"] == cells["ifedicl"]["per_round"][-1]["accuracy"]
    for method in ("local_icl", "local_calibration"):
        per_client = cells[method]["per_client"]
        assert [c["test_examples"] for c in per_client] == [4, 4, 4]  # 12 test examples dealt to 3 clients
        weighted = sum(c["accuracy"] * c["test_examples"] for c in per_client) / 12
        assert cells[method]["accuracy"] == pytest.approx(weighted)
    assert "r3 |" not in (tmp_path / "results.md").read_text()  # the per-round table names the scored rounds
    # round 3 asked for later: topped up from the Λ the cell kept and the run's vectors in the store, not rerun
    also = dataclasses.replace(settings, also_scored_rounds=[2, 3])
    assert also.cell_hash("ifedicl") == settings.cell_hash("ifedicl")  # a round's score changes no other number
    path = next((tmp_path / "cells").glob("ifedicl__*.json"))
    record = json.loads(path.read_text())
    round_2 = next(p for p in record["per_round"] if p["round"] == 2)
    record["per_round"] = [p for p in record["per_round"] if p["round"] != 2]  # as if round 2 had not been scored
    path.write_text(json.dumps(record))
    topped = {c["method"]: c for c in evaluate(also, tmp_path)["cells"]}["ifedicl"]
    assert topped["run_id"] == record["run_id"]
    assert [p["round"] for p in topped["per_round"]] == [0, 1, 2, 3, 4]
    assert next(p for p in topped["per_round"] if p["round"] == 2) == round_2  # the score its own cell gave
    spent = [p["client_cpu_seconds"] for p in topped["per_round"]]
    assert spent == sorted(spent) and spent[2] < spent[3] < spent[4]
    assert [later["rounds"] for later in topped["scored_later"]] == [[2, 3]]
    # a run no longer in the (local) store: the cell keeps its rounds and says why, and is not tried again
    topped["per_round"] = [p for p in topped["per_round"] if p["round"] != 1]
    path.write_text(json.dumps(topped))
    shutil.rmtree(tmp_path / "federation_store")
    kept = {c["method"]: c for c in evaluate(dataclasses.replace(also, also_scored_rounds=[1]), tmp_path)["cells"]}
    assert [p["round"] for p in kept["ifedicl"]["per_round"]] == [0, 2, 3, 4]
    assert "does not exist" in kept["ifedicl"]["scored_later"][-1]["not_scored"]
    assert rounds_to_score(dataclasses.replace(also, also_scored_rounds=[1]), kept["ifedicl"]) == []


def test_also_scored_rounds_are_added_to_the_density_and_validated():
    assert scored_rounds(list(range(13)), "doubling", [3]) == [0, 1, 2, 3, 4, 8, 12]
    assert scored_rounds(list(range(3)), "doubling", [3]) == [0, 1, 2]  # a round the run did not reach
    with pytest.raises(ValueError, match="also_scored_rounds must be round numbers"):
        EvalSettings(model="m", tasks=["t"], also_scored_rounds=[-1]).validate()
