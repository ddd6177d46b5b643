"""The report grid (``ifedicl report``): atomic cells, resume without recomputation, files rebuilt from cells.

Tiny random Llama, the real harness (real methods, real cell files); small Ray
federations for the recalibration cells and the worker processes. No accuracy is asserted.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess

import pytest

from ifedicl.evaluation import runner
from ifedicl.evaluation.cells import CellStore, write_atomic
from ifedicl.evaluation.grid import GridSpec, finished_cells, in_order, run_grid, write_report
from ifedicl.evaluation.report import describe_checkout
from ifedicl.evaluation.settings import Cell, EvalSettings

BASE = dict(clients=3, alphas=[1.0], rounds=1, test_size=8, shots=2, max_train=24, min_shard=4, batch_size=8)
COMMAND = "ifedicl report --tiny"


def _spec(model, task, **kw) -> GridSpec:
    args = dict(
        models=[str(model)],
        tasks=[str(task)],
        seeds=[0, 1],
        objectives=["full-vocab", "label-only"],
        methods=["zero_shot", "few_shot_icl", "i2cl_central"],
        base=dict(BASE),
    )
    return GridSpec(**{**args, **kw})


class Interrupt(BaseException):
    """Stands for Ctrl-C / a killed session (not an Exception: nothing may swallow it)."""


@pytest.fixture
def counted(monkeypatch):
    """Every method invocation, as (group dir, cell key); optionally interrupt before invocation number N."""
    calls: list[tuple[str, str]] = []
    state = {"interrupt_at": None}
    for name, fn in list(runner.METHOD_FUNCTIONS.items()):

        def wrapper(mc, task, cell, fn=fn):
            if state["interrupt_at"] == len(calls) + 1:
                raise Interrupt
            calls.append((str(mc.out_dir), cell.key))
            return fn(mc, task, cell)

        monkeypatch.setitem(runner.METHOD_FUNCTIONS, name, wrapper)
    return calls, state


def test_the_code_version_is_dirty_for_changed_code_but_not_for_new_results(tmp_path):
    """The report renders its summary before its new cells are committed: those are results, not code."""

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    assert describe_checkout(tmp_path) is None  # not a checkout: the caller falls back to the package version
    (tmp_path / "docs").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "cell.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True)
    clean = commit.stdout.strip()
    assert describe_checkout(tmp_path) == clean
    (tmp_path / "docs" / "cell.json").write_text('{"accuracy": 0.5}\n')  # a changed result
    (tmp_path / "docs" / "new.json").write_text("{}\n")  # a new one
    assert describe_checkout(tmp_path / "docs") == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert describe_checkout(tmp_path / "docs") == f"{clean}-dirty"


def test_cell_writes_are_atomic_and_half_cells_are_not_finished(tmp_path, monkeypatch):
    settings = EvalSettings("m", ["/data/subj"])
    store = CellStore(tmp_path, settings, "v1")
    cell = Cell("zero_shot", "/data/subj", None, 0)
    record = store.put(cell, "subj", {"accuracy": 0.5, "macro_f1": 0.5, "cost": {"wall_s": 1.0}})
    assert store.get(cell) == record and record["code_version"] == "v1"
    path = store.path(cell)
    assert path.name == "zero_shot__subj__ana__s0.json"  # the task's name, not where it lives: resumes anywhere

    # A crash in the middle of a rewrite: the finished cell stays whole and no temp file is left behind.
    def crash(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put(cell, "subj", {"accuracy": 0.9, "macro_f1": 0.9, "cost": {"wall_s": 1.0}})
    monkeypatch.undo()
    assert store.get(cell) == record
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    # What a non-atomic writer would leave: a prefix of the JSON. Never read as finished.
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    assert store.get(cell) is None
    # Whole JSON but not a finished cell (no cost) / other settings: not finished either.
    write_atomic(path, json.dumps({k: v for k, v in record.items() if k != "cost"}))
    assert store.get(cell) is None
    write_atomic(path, json.dumps(record))
    assert store.get(cell) == record
    assert CellStore(tmp_path, dataclasses.replace(settings, shots=8)).get(cell) is None


def test_a_new_training_recipe_leaves_the_prompt_only_cells_finished(tmp_path):
    """Zero-shot and ICL cells do not depend on rounds, epochs, the recipe or the federation: a change there
    recomputes only the trainable cells."""
    settings = EvalSettings("m", ["/data/subj"], rounds=3, local_epochs=1)
    store = CellStore(tmp_path, settings)
    done = {"accuracy": 0.5, "macro_f1": 0.5, "cost": {"wall_s": 1.0}}
    cells = {m: Cell(m, "/data/subj", 0.5, 0) for m in ("zero_shot", "few_shot_icl", "local_icl", "ifedicl")}
    for cell in cells.values():
        store.put(cell, "subj", done)
    changes = {"rounds": 12, "local_epochs": 0.25, "recipe": {"lr": 3e-2}, "weighted": True,
               "objective": "full-vocab", "federation": {"vector_coding": "float16"}}  # fmt: skip
    for name, value in changes.items():
        changed = CellStore(tmp_path, dataclasses.replace(settings, **{name: value}))
        for method, cell in cells.items():
            assert (changed.get(cell) is None) == (method == "ifedicl"), (name, method)
    for name, value in {"shots": 8, "test_size": 100, "dtype": "bfloat16", "clients": 5}.items():
        changed = CellStore(tmp_path, dataclasses.replace(settings, **{name: value}))
        assert all(changed.get(cell) is None for cell in cells.values()), name


def test_a_new_split_of_the_same_passes_leaves_the_cells_that_train_alone_finished(tmp_path):
    """I2CL central and local-only train rounds × local epochs under one schedule: 3 × 1 and 12 × ¼ are the same
    cell for them (not for IFed-ICL); other passes, or anything else they read, are not."""
    settings = EvalSettings("m", ["/data/subj"], rounds=3, local_epochs=1)
    store = CellStore(tmp_path, settings)
    done = {"accuracy": 0.5, "macro_f1": 0.5, "cost": {"wall_s": 1.0}}
    cells = {m: Cell(m, "/data/subj", 0.5, 0) for m in ("i2cl_central", "local_calibration", "ifedicl")}
    for cell in cells.values():
        store.put(cell, "subj", done)
    same_passes = CellStore(tmp_path, dataclasses.replace(settings, rounds=12, local_epochs=0.25))
    for method, cell in cells.items():
        assert (same_passes.get(cell) is None) == (method == "ifedicl"), method
    for changes in ({"rounds": 6}, {"local_epochs": 0.5}, {"recipe": {"lr": 3e-2}}, {"objective": "full-vocab"}):
        changed = CellStore(tmp_path, dataclasses.replace(settings, **changes))
        assert all(changed.get(cell) is None for cell in cells.values()), changes


def test_interrupted_report_resumes_without_recomputing(llama_dir, task_dir, tmp_path, counted):
    calls, state = counted
    spec = _spec(llama_dir, task_dir)
    out = tmp_path / "report"
    groups = spec.groups(out)
    assert [len(g.settings.methods) for g in groups] == [3, 1]  # prompt-only methods once, trainable per objective
    total = 2 * 3 + 2 * 1

    state["interrupt_at"] = 4  # killed before the 4th cell: three cells finished
    with pytest.raises(Interrupt):
        run_grid(spec, out, COMMAND)
    first = list(calls)
    assert len(first) == 3
    finished, todo, n = finished_cells(groups)
    assert (len(finished), len(todo), n) == (3, total - 3, total)
    assert first == [
        (str(out / llama_dir.name / "full-vocab"), k)
        for k in (
            "zero_shot__demo-sentiment__ana__s0",
            "few_shot_icl__demo-sentiment__ana__s0",
            "i2cl_central__demo-sentiment__ana__s0",
        )
    ]  # seed-major: every method at seed 0 first

    state["interrupt_at"] = None
    results = run_grid(spec, out, COMMAND)
    second = calls[len(first) :]
    assert len(second) == total - 3 and not set(second) & set(first)  # nothing finished was recomputed
    assert results["run"] == {"cells": total, "computed": total - 3, "resumed": 3}
    assert results["finished"] == total

    third = run_grid(spec, out, COMMAND)
    assert len(calls) == total and third["run"]["computed"] == 0

    # A bounded session computes at most max_cells and leaves the rest for the next one.
    bigger = _spec(llama_dir, task_dir, seeds=[0, 1, 2])
    assert run_grid(bigger, out, COMMAND, max_cells=1)["run"]["computed"] == 1
    assert len(calls) == total + 1


def test_results_are_rebuilt_from_the_cells(llama_dir, task_dir, tmp_path):
    spec = _spec(llama_dir, task_dir, seeds=[0], methods=["zero_shot", "i2cl_central"])
    out = tmp_path / "report"
    results = run_grid(spec, out, COMMAND)
    md = (out / "results.md").read_text()
    assert COMMAND in md and results["code_version"] in md
    assert results["cell_code_versions"] and all(v in md for v in results["cell_code_versions"])
    for cell in (out / llama_dir.name).glob("*/cells/*.json"):
        record = json.loads(cell.read_text())
        assert record["cost"]["wall_s"] > 0 and record["cost"]["cpu_s"] > 0 and record["code_version"]

    # Delete every summary file and edit one cell: render-only rebuilds both from the cells alone.
    for name in ("results.md", "results.json"):
        (out / name).unlink()
    cell_path = next((out / llama_dir.name / "label-only" / "cells").glob("i2cl_central__*.json"))
    record = json.loads(cell_path.read_text())
    record["accuracy"] = 0.123
    write_atomic(cell_path, json.dumps(record))
    rebuilt = write_report(spec, out, COMMAND)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(rebuilt["summary"]))
    by_col = on_disk["summary"][str(llama_dir)]["demo-sentiment"]
    assert by_col["i2cl_central@label-only"]["accuracy_mean"] == pytest.approx(0.123)
    row = next(x for x in (out / "results.md").read_text().splitlines() if x.startswith(f"| {llama_dir} |"))
    assert "| 12.3 |" in row  # one seed: a mean, no spread
    assert (out / llama_dir.name / "label-only" / "results.md").exists()


def test_a_narrowed_run_computes_its_cells_and_keeps_the_rest_of_the_report(llama_dir, task_dir, tmp_path, counted):
    """--methods (or --tasks, --seeds, --variants) narrower than the folder's report computes only those cells;
    results.json/md keep every column and the report's command. A wider grid replaces the recorded one."""
    calls, _ = counted
    whole = _spec(llama_dir, task_dir, seeds=[0], objectives=["label-only"], methods=["zero_shot", "i2cl_central"])
    out = tmp_path / "report"
    assert run_grid(whole, out, COMMAND, max_cells=1)["finished"] == 1  # zero-shot
    narrowed = _spec(llama_dir, task_dir, seeds=[0], objectives=["label-only"], methods=["i2cl_central"])
    results = run_grid(narrowed, out, "ifedicl report --methods i2cl_central")
    assert [key.split("__")[0] for _, key in calls] == ["zero_shot", "i2cl_central"]
    assert results["run"]["computed"] == 1
    on_disk = json.loads((out / "results.json").read_text())
    assert (on_disk["finished"], on_disk["total"], on_disk["command"]) == (2, 2, COMMAND)
    assert on_disk["spec"]["methods"] == ["zero_shot", "i2cl_central"]
    header = next(x for x in (out / "results.md").read_text().splitlines() if x.startswith("| model | task"))
    assert "zero-shot" in header and "I2CL (central)" in header
    assert write_report(narrowed, out, "ifedicl report --render-only")["finished"] == 2  # render-only alike

    other_recipe = _spec(llama_dir, task_dir, seeds=[0], objectives=["label-only"], methods=["zero_shot"],
                         base={**BASE, "shots": 3})  # fmt: skip
    assert write_report(other_recipe, out, "ifedicl report --shots 3")["spec"]["methods"] == ["zero_shot"]
    wider = _spec(llama_dir, task_dir, seeds=[0, 1], objectives=["label-only"], methods=["zero_shot"])
    wider_results = write_report(wider, out, "ifedicl report --seeds 2")
    assert (wider_results["command"], wider_results["spec"]["seeds"]) == ("ifedicl report --seeds 2", [0, 1])


def test_ablation_variants_are_cells_of_their_own(llama_dir, task_dir, tmp_path, counted):
    from ifedicl.evaluation.variants import ABLATION_VARIANTS

    calls, _ = counted
    assert not [v for v in ABLATION_VARIANTS if "," in v or ";" in v]  # --variants is a comma-separated list
    variants = {v: ABLATION_VARIANTS[v] for v in ("default", "attention only", "lr 3e-2")}
    spec = _spec(llama_dir, task_dir, seeds=[0], objectives=["label-only"], methods=["i2cl_central"], variants=variants)
    out = tmp_path / "ablation"
    results = run_grid(spec, out, "ifedicl ablate --tiny")
    assert len(calls) == 3 and results["finished"] == 3
    folders = sorted(p.parent.parent.name for p in out.glob("*/label-only/*/cells/*.json"))
    assert folders == ["attention_only", "default", "lr_3e-2"]
    attn = json.loads(next(out.glob("*/label-only/attention_only/cells/*.json")).read_text())
    coefficients = [layer[1] for layer in attn["coefficients"]]  # the MLP block: not injected, not trained
    assert all(block == [0.0, 1.0] for block in coefficients)
    md = (out / "results.md").read_text()
    for variant in variants:
        row = next(x for x in md.splitlines() if x.startswith(f"| {variant} |"))
        assert re.search(r"\| \d+\.\d / \d+ s \|", row), row  # one seed: the mean, no spread
    assert run_grid(spec, out, "ifedicl ablate --tiny")["run"]["computed"] == 0 and len(calls) == 3


def test_a_variant_named_for_a_curvature_computes_it_on_every_task():
    """A variant is read by its name: one that names the sampled matrix, the exact one or the empirical Fisher
    computes it whatever ``--curvature auto`` would choose on the task (auto's choice has moved twice: above 4
    classes from the sampled matrix to the empirical Fisher, then at 4 from the exact matrix on a quarter of the
    rows to it)."""
    from ifedicl.evaluation.settings import FEDERATION_HASH_BASELINE, EvalSettings
    from ifedicl.evaluation.variants import ABLATION_BASE, ABLATION_VARIANTS

    named = {"sampled": "sampled", "exact matrix": "exact", "empirical fisher": "empirical"}
    checked = []
    for variant, overrides in ABLATION_VARIANTS.items():
        wanted = [curvature for word, curvature in named.items() if word in variant]
        if not wanted:
            continue
        federation = {**ABLATION_BASE["federation"], **overrides.get("federation", {})}
        settings = EvalSettings(model="m", tasks=["t"], federation=federation)
        for classes in (2, 3, 4, 6):
            effective = settings.federation_for_hash("ifedicl", classes)
            assert effective.get("curvature", FEDERATION_HASH_BASELINE["curvature"]) == wanted[0], (variant, classes)
        checked.append(variant)
    assert "gauss-newton sampled matrix on ¼" in checked and len(checked) >= 6


def test_workers_write_the_cells_one_process_would(llama_dir, task_dir, tmp_path):
    """Two worker processes: the deterministic cells equal the serial report's, the federated cell runs its
    own Ray in its worker, the report files are rewritten by the parent, and a rerun computes nothing."""
    methods = ["zero_shot", "i2cl_central", "ifedicl"]
    spec = _spec(llama_dir, task_dir, seeds=[0], objectives=["label-only"], methods=methods)
    serial_out, parallel_out = tmp_path / "serial", tmp_path / "parallel"
    run_grid(_spec(llama_dir, task_dir, seeds=[0], objectives=["label-only"], methods=methods[:2]), serial_out, COMMAND)
    progress = io.StringIO()
    parallel = run_grid(spec, parallel_out, COMMAND, stream=progress, workers=2)
    assert parallel["run"] == {"cells": 3, "computed": 3, "resumed": 0} and parallel["finished"] == 3
    # Two cells in flight: each "done" line names its own cell, not whichever started last.
    done = sorted(line.split("] ", 1)[1].split(" done in")[0] for line in progress.getvalue().splitlines()
                  if " done in " in line)  # fmt: skip
    labels = ("zero-shot", "I2CL (central) [label-only]", "IFed-ICL [label-only]")
    assert done == sorted(f"{llama_dir} {task_dir.name} seed 0 {label}" for label in labels), done

    cells = parallel_out / llama_dir.name / "label-only" / "cells"
    for serial_path in (serial_out / llama_dir.name / "label-only" / "cells").glob("*.json"):
        serial, twin = json.loads(serial_path.read_text()), json.loads((cells / serial_path.name).read_text())
        for field in ("settings_hash", "accuracy", "macro_f1", "coefficients"):
            assert serial.get(field) == twin.get(field), (serial_path.name, field)
    (federated,) = cells.glob("ifedicl__*.json")
    assert json.loads(federated.read_text())["cost"]["actors_cpu_s"] > 0
    assert "IFed-ICL" in (parallel_out / "results.md").read_text()
    assert run_grid(spec, parallel_out, COMMAND, workers=2)["run"]["computed"] == 0
    with pytest.raises(ValueError, match="workers"):
        run_grid(spec, parallel_out, COMMAND, workers=0)


def test_workers_run_one_federated_cell_at_a_time():
    from ifedicl.evaluation.grid import next_startable

    fed, lora, zero = (Cell(m, "/d/subj", 0.5, 0) for m in ("ifedicl", "fedavg_lora", "zero_shot"))
    assert next_startable([(None, fed), (None, zero)], running=[]) == 0
    assert next_startable([(None, fed), (None, zero)], running=[lora]) == 1  # skips ahead to a local cell
    assert next_startable([(None, fed)], running=[zero]) == 0
    assert next_startable([(None, fed), (None, lora)], running=[fed]) is None


def test_recalibration_cells_start_from_the_live_or_the_initial_coefficients(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Item 6's ablation: the recalibration that follows the federation, warm (from the live Λ) or cold."""
    from ifedicl.evaluation.variants import ABLATION_VARIANTS

    variants = {v: ABLATION_VARIANTS[v] for v in ("recalibration: warm start", "recalibration: cold start")}
    spec = _spec(llama_dir, task_dir, seeds=[0], objectives=["label-only"], methods=["ifedicl"], variants=variants)
    out = tmp_path / "ablation"
    assert run_grid(spec, out, "ifedicl ablate --tiny")["finished"] == 2
    warm, cold = (
        json.loads(next(out.glob(f"*/label-only/recalibration__{start}_start/cells/*.json")).read_text())
        for start in ("warm", "cold")
    )
    for record, start in ((warm, "warm"), (cold, "cold")):
        live = record["recalibration"]["live"]
        assert record["recalibration"]["start"] == start and record["run_id"] != live["run_id"]
        assert record["comm"]["stage1_up_per_client"] == 0  # stage 2 only: the live run's vectors
        assert [r["round"] for r in record["per_round"]] == [0, 1] and record["objective"] == "label-only"
        # A federated cell's cost counts the CPU seconds the client actors measured for themselves.
        cost = record["cost"]
        assert cost["actors_cpu_s"] == pytest.approx(record["client_compute"]["client_cpu_seconds"], abs=1e-3)
        assert cost["actors_cpu_s"] > 0  # each field is rounded to the millisecond on its own
        assert cost["cpu_s"] == pytest.approx(cost["process_cpu_s"] + cost["actors_cpu_s"], abs=2e-3)
    # Both recalibrate from one live federation (computed once): the A/B differs only in where Λ starts.
    assert warm["recalibration"]["live"]["run_id"] == cold["recalibration"]["live"]["run_id"]
    # Round 0 of the recalibration scores its starting Λ: the live run's last (warm) or first (cold) one.
    assert warm["per_round"][0]["accuracy"] == warm["recalibration"]["live"]["per_round"][-1]["accuracy"]
    assert warm["per_round"][0]["macro_f1"] == warm["recalibration"]["live"]["per_round"][-1]["macro_f1"]
    assert cold["per_round"][0]["macro_f1"] == cold["recalibration"]["live"]["per_round"][0]["macro_f1"]
    with pytest.raises(ValueError, match="recalibrate"):
        _spec(llama_dir, task_dir, base={**BASE, "recipe": {"recalibrate": "tepid"}}).groups(out)


def test_a_model_can_be_reported_on_some_of_the_tasks(tmp_path):
    """``model_tasks``: Gemma 3 on the paper's tasks only, the other model on every task, seed-major as ever."""
    spec = GridSpec(
        models=["a", "b"], tasks=["/d/subj", "/d/sst2"], seeds=[0, 1], objectives=["label-only"],
        methods=["zero_shot"], base=dict(BASE), model_tasks={"b": ["subj"]},
    )  # fmt: skip
    groups = spec.groups(tmp_path)
    assert {g.model: g.settings.tasks for g in groups} == {"a": ["/d/subj", "/d/sst2"], "b": ["/d/subj"]}
    _, todo, total = finished_cells(groups)
    assert total == 6
    seed_0 = [(0, "a", "/d/subj"), (0, "a", "/d/sst2"), (0, "b", "/d/subj")]
    assert [(c.seed, g.model, c.task) for g, c in todo][:3] == seed_0
    # --order model: model a's cells (seed-major among them) before model b's
    by_model = [(g.model, c.seed, c.task) for g, c in in_order(todo, "model", spec.models)]
    assert by_model == [
        ("a", 0, "/d/subj"), ("a", 0, "/d/sst2"), ("a", 1, "/d/subj"), ("a", 1, "/d/sst2"),
        ("b", 0, "/d/subj"), ("b", 1, "/d/subj"),
    ]  # fmt: skip
    # the models' order is the grid's even when model a's seed 0 is done and b's first cell comes first
    later = [(g, c) for g, c in todo if not (g.model == "a" and c.seed == 0)]
    assert [(g.model, c.seed) for g, c in in_order(later, "model", spec.models)] == [
        ("a", 1), ("a", 1), ("b", 0), ("b", 1)
    ]
    assert in_order(todo, "seed", spec.models) == todo
    with pytest.raises(ValueError, match="order must be one of"):
        in_order(todo, "task", spec.models)


def test_the_eta_shares_the_cells_among_workers_but_not_the_federated_ones():
    """Federated cells run one at a time: with 2 workers the ETA is the larger of their sum and half of all."""
    from ifedicl.evaluation.progress import Progress
    from ifedicl.evaluation.settings import Cell

    class G:
        model = "m"

        def column(self, method: str) -> str:
            return method

    group = G()
    finished = [
        {"_group_model": "m", "method": m, "_group_column": m, "cost": {"wall_s": wall}}
        for m, wall in (("ifedicl", 100.0), ("i2cl_central", 40.0), ("zero_shot", 10.0))
    ]

    def eta(methods: list[str], workers: int) -> tuple[float, int]:
        todo = [(group, Cell(m, "/d/subj", None, 0)) for m in methods]
        return Progress(finished, todo, len(todo), io.StringIO(), workers=workers).eta()

    assert eta(["ifedicl", "i2cl_central", "zero_shot"], workers=1) == (150.0, 0)
    assert eta(["ifedicl", "i2cl_central", "zero_shot"], workers=2) == (100.0, 0)  # the federated cell bounds it
    assert eta(["i2cl_central", "i2cl_central", "zero_shot", "zero_shot"], workers=2) == (50.0, 0)
    assert eta(["ifedicl", "fedavg_lora"], workers=2) == (100.0, 1)  # LoRA not yet timed: counted apart


def test_the_report_and_the_ablation_compute_with_their_own_defaults(tmp_path):
    """What ``ifedicl report`` and ``ifedicl ablate`` compute with (dtype, budget, test size, hosting, the
    ablation's local-steps base) unless told otherwise (render-only: no cell); Gemma 3 gets the paper's tasks."""
    from typer.testing import CliRunner

    from ifedicl.cli.main import app
    from ifedicl.evaluation.variants import REPORT_DEFAULTS

    data = tmp_path / "data"
    report_recipe = {k: REPORT_DEFAULTS[k] for k in ("rounds", "local_epochs", "test_size")}
    ablation_base = {"vector_coding": "float32", "stage2": "local-steps", "stage1_examples": 0}  # every example
    for command, expected in (
        (["report"], {"dtype": "float32", "federation": {"actors": 2}, **report_recipe}),
        (["ablate"], {"federation": ablation_base, "rounds": 3, "local_epochs": 1, "test_size": 200}),
        (["ablate", "--dtype", "bfloat16"], {"dtype": "bfloat16", "federation": ablation_base}),
        (["report", "--rounds", "6", "--local-epochs", "0.5", "--test-size", "100"], {"rounds": 6, "test_size": 100}),
    ):
        out = tmp_path / "_".join(command)
        args = [*command, "--out", str(out), "--data-dir", str(data), "--render-only"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        base = json.loads((out / "results.json").read_text())["spec"]["base"]
        assert {k: base.get(k, {}) for k in expected} == expected, command
        if command == ["report"]:
            spec = json.loads((out / "results.json").read_text())["spec"]
            assert spec["objectives"] == ["label-only"]
            assert spec["model_tasks"] == {"gemma3-270m": ["subj", "emotion", "agnews"]}
    bad = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "x"), "--workers", "0", "--render-only"])
    assert bad.exit_code == 2 and "--workers must be >= 1" in bad.output


def test_render_only_rewrites_a_readme_s_headline_table_and_nothing_else(tmp_path):
    """``--readme``: the text between the headline markers becomes the accuracy table over the whole planned grid
    (a row per model × task, finished or not); the rest of the file and its permissions stay. A file without the
    block is refused before any work, unchanged."""
    from typer.testing import CliRunner

    from ifedicl.cli.main import app
    from ifedicl.evaluation.render import HEADLINE_BEGIN, HEADLINE_END

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{HEADLINE_BEGIN}\n| stale | table |\n{HEADLINE_END}\n\nafter\n")
    readme.chmod(0o644)
    args = ["report", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), "--render-only"]
    result = CliRunner().invoke(app, [*args, "--readme", str(readme)])
    assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert text.startswith(f"# Title\n\n{HEADLINE_BEGIN}\n| model | task | zero-shot |") and text.endswith(
        f"{HEADLINE_END}\n\nafter\n"
    )
    assert "stale" not in text and "| gemma3-270m | agnews | – |" in text and "| smollm2-135m | trec | – |" in text
    assert "[label-only]" not in text  # one objective: named in the prose, not in every header
    assert readme.stat().st_mode & 0o777 == 0o644
    # the reproducing command in results.md drops what shapes one session, --readme included
    from ifedicl.cli.report import _reproducing

    session = ["--max-cells", "1", "--workers=2", "--order", "model", "--readme", "README.md", "--render-only"]
    assert _reproducing(["--out", "docs/report", *session, "--seeds", "3"]) == ["--out", "docs/report", "--seeds", "3"]

    plain = tmp_path / "plain.md"
    plain.write_text("no block here\n")
    # wide enough that rich's error box does not wrap the message at a point set by tmp_path's length
    refused = CliRunner(env={"COLUMNS": "300"}).invoke(app, [*args, "--readme", str(plain)])
    assert refused.exit_code == 2 and "--readme" in refused.output and "no headline block" in refused.output
    assert plain.read_text() == "no block here\n"
    missing = CliRunner(env={"COLUMNS": "300"}).invoke(app, [*args, "--readme", str(tmp_path / "nope.md")])
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_the_report_warns_before_computing_in_a_dtype_this_cpu_is_slow_in(tmp_path):
    """bfloat16 on a CPU without bfloat16 kernels is ~100x slower than float32: said before any cell runs,
    and only then (``--max-cells 0``: the command starts, computes nothing; float32, the default, never warns)."""
    from typer.testing import CliRunner

    from ifedicl.cli.main import app
    from ifedicl.kernel.modeling import slow_dtype_reason

    def stderr_of(*dtype_args: str) -> str:
        args = ["report", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path), "--max-cells", "0"]
        result = CliRunner().invoke(app, [*args, *dtype_args])
        assert result.exit_code == 0, result.output
        return result.stderr

    slow = slow_dtype_reason("bfloat16")
    assert slow is None or "float32" in slow
    assert ("warning: bfloat16" in stderr_of("--dtype", "bfloat16")) == (slow is not None)
    assert "warning" not in stderr_of()  # the report's default dtype, float32
    assert "warning" not in stderr_of("--dtype", "float32")
    assert slow_dtype_reason("float32") is None and slow_dtype_reason("bfloat16", device="cuda") is None


def _record(
    method: str, seed: int, accuracy: float, curve: list[tuple[float, float]] | None = None, task: str = "subj"
) -> dict:
    """A finished cell as the grid tags it; ``curve``: (accuracy, client CPU seconds spent) after each round."""
    record = {"method": method, "task": task, "seed": seed, "accuracy": accuracy, "_group_model": "m",
              "_group_objective": "label-only", "_group_column": f"{method}@label-only"}  # fmt: skip
    if curve is not None:
        record["per_round"] = [{"round": r, "accuracy": a, "client_cpu_seconds": c} for r, (a, c) in enumerate(curve)]
        record["client_cpu_seconds"] = curve[-1][1]
    return record


def test_paired_differences_and_the_round_budget_that_reaches_lora():
    """Per seed: IFed-ICL minus each baseline on the same split; the budget: the first round whose mean over
    seeds reaches LoRA's final mean, and the CPU spent by then against LoRA's whole run."""
    from ifedicl.evaluation.comparison import paired_differences

    records = [
        _record("ifedicl", 0, 0.80, [(0.5, 10.0), (0.70, 20.0), (0.80, 30.0), (0.80, 40.0)]),
        _record("ifedicl", 1, 0.84, [(0.5, 12.0), (0.74, 22.0), (0.82, 32.0), (0.84, 42.0)]),
        _record("fedavg_lora", 0, 0.78, [(0.5, 0.0), (0.78, 50.0)]),
        _record("fedavg_lora", 1, 0.80, [(0.5, 0.0), (0.80, 50.0)]),
        _record("i2cl_central", 0, 0.85),  # seed 1 not finished: only seed 0 is paired
    ]
    entry = paired_differences(records)["m"]["subj"]["label-only"]
    assert entry["vs fedavg_lora"]["differences"] == pytest.approx([2.0, 4.0])
    assert entry["vs fedavg_lora"]["mean"] == pytest.approx(3.0) and entry["vs fedavg_lora"]["std"] > 0
    assert entry["vs i2cl_central"]["seeds"] == [0] and entry["vs i2cl_central"]["mean"] == pytest.approx(-5.0)
    budget = entry["budget"]  # LoRA's mean: 0.79; IFed-ICL's mean curve: 0.5, 0.72, 0.81, 0.82
    assert budget["round"] == 2 and budget["client_cpu_seconds"] == pytest.approx(31.0)
    assert budget["cpu_ratio"] == pytest.approx(31.0 / 50.0)
    assert budget["whole_run_cpu_ratio"] == pytest.approx(41.0 / 50.0)
    # half of LoRA's CPU (25 s) buys round 1 (21 s spent), 0.72: the last round within it
    assert budget["half_lora_cpu"] == pytest.approx({"round": 1, "accuracy": 0.72, "cpu_ratio": 21.0 / 50.0})
    stronger_lora = [r if r["method"] != "fedavg_lora" else {**r, "accuracy": 0.9} for r in records]
    assert paired_differences(stronger_lora)["m"]["subj"]["label-only"]["budget"]["round"] is None
    # LoRA's seed 2 has no IFed-ICL twin yet: the budget pairs the seeds both finished, as the differences do
    unpaired = [*records, _record("fedavg_lora", 2, 0.99, [(0.5, 0.0), (0.99, 90.0)])]
    assert paired_differences(unpaired)["m"]["subj"]["label-only"]["budget"] == budget
    from ifedicl.evaluation.render import _recipe_targets

    # TREC is not one of issue 30's tasks: the mean over tasks is given with it and without it
    with_trec = [*records, _record("ifedicl", 0, 0.70, task="trec"), _record("i2cl_central", 0, 0.60, task="trec")]
    results = {"paired": paired_differences(with_trec), "spec": {"objectives": ["label-only"]}}
    text = "\n".join(_recipe_targets(results))
    assert "| m | subj | label-only | +3.0 ± 1.4 (n=2) | -5.0 (n=1) | 0.82× | 2 | 0.62× | 1: -7.0 |" in text
    # at half LoRA's CPU, on issue 30's tasks only (TREC has no LoRA cell here, so no budget), and on the seeds
    # I2CL central finished too: seed 0 alone, whose round 1 (20 s of LoRA's 50) reached 0.70
    assert "m [label-only], subj: IFed-ICL within ½ of FedAvg-LoRA's client CPU 70.0, I2CL central 85.0" in text
    # the means pair seeds too: I2CL central finished seed 0 only, so IFed-ICL's seed 1 (84.0) is left out
    assert "m [label-only], subj: IFed-ICL 80.0, I2CL central 85.0 (-5.0; target ≥ −1)" in text
    assert "m [label-only], subj, trec: IFed-ICL 75.0, I2CL central 72.5 (+2.5; target ≥ −1)" in text
    # Emotion's cells first, TREC's left out: every task is one of issue 30's, whatever their order, so the mean
    # over tasks is one line, not the same twice
    emotion = [_record("ifedicl", 0, 0.50, task="emotion"), _record("i2cl_central", 0, 0.60, task="emotion")]
    paired = paired_differences([*emotion, *records])
    alone = "\n".join(_recipe_targets({"paired": paired, "spec": {"objectives": ["label-only"]}}))
    assert alone.count("IFed-ICL 65.0, I2CL central 72.5") == 1
