"""The evaluation harness end to end: real tiny model, real Ray federation, real peft LoRA.

One small run (3 clients, 2 rounds, 1 seed, a dozen test examples) is shared by
most tests. No accuracy value is asserted: the model is random.
"""

from __future__ import annotations

import json
import re
import struct

import pytest

from ifedicl.evaluation.report import pct
from ifedicl.evaluation.runner import evaluate
from ifedicl.evaluation.settings import METHOD_LABELS, METHODS, EvalSettings
from ifedicl.kernel.data import load_task_dir

ROUNDS, CLIENTS = 2, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _settings(model, task, **kw) -> EvalSettings:
    base = dict(
        model=str(model),
        tasks=[str(task)],
        clients=CLIENTS,
        alphas=[1.0],
        rounds=ROUNDS,
        seeds=[0],
        test_size=12,
        shots=2,
        max_train=36,
        min_shard=4,
        batch_size=8,
    )
    return EvalSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def run(ray_session, llama_dir, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    settings = _settings(llama_dir, task_dir)
    results = evaluate(settings, out)
    return settings, out, results


def _cell(results, method):
    (cell,) = [c for c in results["cells"] if c["method"] == method]
    return cell


def test_every_method_produces_numbers_in_range(run):
    _, _, results = run
    assert results["run"] == {"cells": len(METHODS), "resumed": 0, "computed": len(METHODS)}
    assert {c["method"] for c in results["cells"]} == set(METHODS)
    for cell in results["cells"]:
        assert 0.0 <= cell["accuracy"] <= 1.0, cell["method"]
        assert 0.0 <= cell["macro_f1"] <= 1.0, cell["method"]
        assert cell["client_seconds"] >= 0
        assert all(v >= 0 for v in cell["comm"].values())
    for method in ("ifedicl", "fedavg_lora"):
        per_round = _cell(results, method)["per_round"]
        assert [p["round"] for p in per_round] == list(range(ROUNDS + 1))
        assert all(0 <= p["accuracy"] <= 1 and 0 <= p["macro_f1"] <= 1 for p in per_round)
        assert _cell(results, method)["accuracy"] == per_round[-1]["accuracy"]
    for method in ("local_icl", "local_calibration"):
        assert len(_cell(results, method)["per_client"]) == CLIENTS
    ifed = _cell(results, "ifedicl")["comm"]
    assert ifed["stage1_up_per_client"] > ifed["round_up_per_client"] > 0  # vectors once, then 4L scalars
    for method in ("i2cl_central", "local_calibration", "ifedicl", "fedavg_lora"):  # one default loss for all
        assert _cell(results, method)["objective"] == "label-only", method


def test_federated_client_time_is_what_the_actors_measured(run):
    """IFed-ICL and FedAvg-LoRA: the client-time columns are the actors' own reports, for every client."""
    _, _, results = run
    for method, stages in (("ifedicl", {"extract", "calibrate"}), ("fedavg_lora", {"train"})):
        cell = _cell(results, method)
        reported = cell["client_compute"]
        per_client = reported["client_seconds_per_client"]
        assert sorted(per_client) == [str(c) for c in range(CLIENTS)]
        assert set(reported["client_seconds_by_stage"]) == stages
        assert all(c["cpu"] > 0 and c["wall"] > 0 for c in per_client.values())
        assert cell["client_seconds"] == pytest.approx(sum(c["wall"] for c in per_client.values()) / CLIENTS)
        assert cell["client_cpu_seconds"] == pytest.approx(sum(c["cpu"] for c in per_client.values()) / CLIENTS)
        assert reported["client_cpu_seconds"] == pytest.approx(sum(c["cpu"] for c in per_client.values()), abs=1e-3)
        # every round is a budget: the CPU spent by then, growing to the whole run's
        spent = [p["client_cpu_seconds"] for p in cell["per_round"]]
        assert spent == sorted(spent) and spent[-1] == pytest.approx(cell["client_cpu_seconds"], abs=1e-3)
        assert spent[ROUNDS] > spent[1] > 0
    assert results["model_id"] and results["code_version"] and results["settings"]["rounds"] == ROUNDS


def test_json_and_markdown_agree(run):
    _, out, results = run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(results["summary"]))
    markdown = (out / "results.md").read_text()
    (task,) = on_disk["summary"]
    by_method = on_disk["summary"][task]["1"]
    table1 = markdown.split("## Table 1: accuracy")[1].split("##")[0]
    header = next(line for line in table1.splitlines() if line.startswith("| dataset"))
    row = next(line for line in table1.splitlines() if line.startswith(f"| {task} |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    values = [c.strip() for c in row.strip("|").split("|")]
    for method in METHODS:
        expected = pct(by_method[method]["accuracy_mean"], by_method[method]["accuracy_std"])
        assert values[columns.index(METHOD_LABELS[method])] == expected, method
    table2 = markdown.split("## Table 2")[1].split("##")[0]
    for method in ("ifedicl", "fedavg_lora"):
        line = next(x for x in table2.splitlines() if f"| {METHOD_LABELS[method]} |" in x)
        comm = by_method[method]["comm"]
        assert f"| {comm['round_up_per_client']:.0f} (" in line and f"| {comm['total_up']:.0f} |" in line
    ratio = (
        by_method["fedavg_lora"]["comm"]["round_up_per_client"] / by_method["ifedicl"]["comm"]["round_up_per_client"]
    )
    assert f"{ratio:,.1f}×" in table2
    rounds_table = markdown.split("## Accuracy after every scored round")[1]
    ifed_line = next(x for x in rounds_table.splitlines() if "| IFed-ICL |" in x)
    assert re.findall(r"\d+\.\d", ifed_line) == [
        f"{100 * p['accuracy_mean']:.1f}" for p in by_method["ifedicl"]["per_round"]
    ]


def test_plots_are_valid_pngs(run):
    import matplotlib.image

    _, out, results = run
    names = sorted(p.name for p in out.glob("*.png"))
    assert any(n.startswith("accuracy_vs_round_") for n in names)
    assert any(n.startswith("coefficients_") for n in names)
    assert any(n.startswith("accuracy_vs_client_cpu_") for n in names)
    for path in out.glob("*.png"):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        assert width > 100 and height > 100
        assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_lora_measured_bytes_equal_trainable_parameter_bytes(run, llama_dir):
    from transformers import AutoConfig

    _, _, results = run
    cell = _cell(results, "fedavg_lora")
    lora = cell["lora"]
    assert lora["target_modules"] == ["q_proj", "v_proj"] and lora["rank"] == 8
    # Independently from the config: A is [r, d_in], B is [d_out, r], float32, on q and v of every layer.
    config = AutoConfig.from_pretrained(llama_dir)
    d, head = config.hidden_size, config.head_dim
    q_out, v_out = config.num_attention_heads * head, config.num_key_value_heads * head
    params = config.num_hidden_layers * sum(8 * d + out * 8 for out in (q_out, v_out))
    assert lora["trainable_parameters"] == params
    assert lora["trainable_bytes"] == 4 * params
    # Measured upload = parameter bytes + framing (8-byte length + safetensors JSON header naming 4 tensors/layer).
    comm = cell["comm"]
    low, high = lora["upload_framing_bytes"]
    assert lora["trainable_bytes"] + low <= comm["round_up_per_client"] <= lora["trainable_bytes"] + high
    assert 0 < low <= high < 200 * 4 * config.num_hidden_layers
    assert comm["total_up"] == pytest.approx(ROUNDS * CLIENTS * comm["round_up_per_client"])
    assert comm["stage1_up_per_client"] == 0  # no stage 1: adapters every round


def test_resume_skips_finished_cells_and_adds_only_new_ones(run):
    settings, out, first = run
    cells_dir = out / "cells"
    mtimes = {p.name: p.stat().st_mtime_ns for p in cells_dir.glob("*.json")}
    again = evaluate(settings, out)
    assert again["run"] == {"cells": len(METHODS), "resumed": len(METHODS), "computed": 0}
    assert {p.name: p.stat().st_mtime_ns for p in cells_dir.glob("*.json")} == mtimes
    assert again["summary"] == first["summary"]
    # A second α: the split-free zero-shot cell is reused, only local ICL at the new α is computed.
    sweep = _settings(settings.model, settings.tasks[0], alphas=[1.0, 0.3], methods=["zero_shot", "local_icl"])
    swept = evaluate(sweep, out)
    assert swept["run"] == {"cells": 3, "resumed": 2, "computed": 1}
    assert (out / "cells" / next(p.name for p in cells_dir.glob("local_icl__*__a0.3__s0.json"))).exists()
    assert any(p.name.startswith("accuracy_vs_alpha_") for p in out.glob("*.png"))
    # Changed settings make the stored cells stale: they are recomputed, not silently reused.
    changed = _settings(settings.model, settings.tasks[0], test_size=8, methods=["zero_shot"])
    assert evaluate(changed, out)["run"] == {"cells": 1, "resumed": 0, "computed": 1}
    # --objective applies to every trainable method and is a setting like the others.
    full_vocab = _settings(settings.model, settings.tasks[0], objective="full-vocab", methods=["i2cl_central"])
    relabelled = evaluate(full_vocab, out)
    assert relabelled["run"] == {"cells": 1, "resumed": 0, "computed": 1}
    assert _cell(relabelled, "i2cl_central")["objective"] == "full-vocab"
    assert "full-vocab cross-entropy for every trainable method" in (out / "results.md").read_text()


def test_hf_dataset_saved_to_disk_through_the_cli(ray_session, llama_dir, task_dir, tmp_path):
    """The HF path is real: a DatasetDict saved with save_to_disk, loaded by name-as-path, federated on Ray."""
    import datasets
    import typer
    from typer.testing import CliRunner

    from ifedicl.cli.evaluate import eval_command

    data = load_task_dir(task_dir)
    dataset_dir = tmp_path / "sst2"  # a known name: the loader picks I2CL's SST-2 template and labels
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": data.train.texts, "label": data.train.labels}),
            "test": datasets.Dataset.from_dict({"text": data.test.texts, "label": data.test.labels}),
        }
    ).save_to_disk(str(dataset_dir))
    app = typer.Typer()
    app.command()(eval_command)
    out = tmp_path / "out"
    args = [str(dataset_dir), "--model", str(llama_dir), "--out", str(out), "--clients", "2", "--rounds", "1"]
    args += ["--test-size", "8", "--max-train", "24", "--min-shard", "4", "--methods", "zero_shot,ifedicl"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == ["sst2"]
    ifed = next(c for c in results["cells"] if c["method"] == "ifedicl")
    assert [p["round"] for p in ifed["per_round"]] == [0, 1] and 0 <= ifed["accuracy"] <= 1
    assert ifed["comm"]["round_up_per_client"] > 0
    assert "| sst2 | 0.5 |" in (out / "results.md").read_text()  # the default α, the dataset's task name
