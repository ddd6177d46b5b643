"""The report: ``ifedicl eval`` over a grid of models × tasks × seeds × objectives, resumable cell by cell.

A grid is a set of *groups*, one per (model, objective): each group is an ordinary
evaluation (:class:`EvalSettings` with ``objective`` fixed, all its cells under
``<out>/<model>/<objective>/cells/``), so every cell is the one JSON file ``ifedicl eval``
writes, with its settings hash, code version and cost. The first objective's group runs
every method; the others run only the trainable ones (the prompt-only methods train
nothing, so their numbers do not depend on the objective).

Cells are computed seed-major (every model, task and method at seed 0 before seed 1),
so a report cut short after any number of sessions has the most complete table it can.
Finished cells are never recomputed; after every (model, task, seed) block the summary
files are rewritten from the cells on disk: ``results.json``, ``results.md`` (the
combined report) and, per group, the harness's own ``results.json``/``results.md``/PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ifedicl.evaluation.cells import CellStore, write_atomic
from ifedicl.evaluation.settings import FEDERATED, METHOD_LABELS, METHODS, Cell, EvalSettings, plan_cells

TRAINABLE = ("i2cl_central", "local_calibration", "fedavg_lora", "ifedicl")
PROMPT_ONLY = tuple(m for m in METHODS if m not in TRAINABLE)


@dataclass
class Group:
    model: str
    objective: str
    settings: EvalSettings  # every task and seed of the grid
    out_dir: Path
    variant: str = ""  # the ablation's recipe variant ("" in the report)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.objective}/{self.variant}"

    def column(self, method: str) -> str:
        return _column(method, self.objective) + (f"#{self.variant}" if self.variant else "")


@dataclass
class GridSpec:
    """The grid and the settings every cell shares (``base``: an EvalSettings's fields but model/tasks/seeds)."""

    models: list[str]
    tasks: list[str]  # task locations
    seeds: list[int]
    objectives: list[str] = field(default_factory=lambda: ["full-vocab", "label-only"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    base: dict = field(default_factory=dict)
    # Ablation: named overrides of the base settings (a "recipe" dict is merged into the base recipe);
    # {"": {}} = the report (no variants). Each variant's cells live in their own folder.
    variants: dict[str, dict] = field(default_factory=lambda: {"": {}})

    def groups(self, out: Path) -> list[Group]:
        groups = []
        for model in self.models:
            for i, objective in enumerate(self.objectives):
                methods = [m for m in self.methods if i == 0 or m in TRAINABLE]
                if not methods:
                    continue
                for variant, overrides in self.variants.items():
                    fields = {**self.base, **overrides}
                    for merged in ("recipe", "federation"):  # a variant's dict adds to the base's
                        fields[merged] = {**self.base.get(merged, {}), **overrides.get(merged, {})}
                    settings = EvalSettings(
                        model=model,
                        tasks=list(self.tasks),
                        seeds=list(self.seeds),
                        methods=methods,
                        objective=objective,
                        **fields,
                    )
                    settings.validate()
                    folder = out / _safe(model) / objective
                    folder = folder / _safe(variant) if variant else folder
                    groups.append(Group(model, objective, settings, folder, variant))
        return groups

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _safe(name: str) -> str:
    name = name.rstrip("/").rsplit("/", 1)[-1]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _column(method: str, objective: str) -> str:
    return method if method in PROMPT_ONLY else f"{method}@{objective}"


def column_label(column: str) -> str:
    column, _, variant = column.partition("#")
    method, _, objective = column.partition("@")
    return METHOD_LABELS[method] + (f" [{objective}]" if objective else "") + (f" {variant}" if variant else "")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """One line per cell on stderr: which cell, its index in the grid, and the ETA from measured costs.

    A cell's expected wall time is the mean of finished cells of the same (model, method,
    objective) when there are any, else of the same method on any model, else unknown.
    """

    def __init__(self, finished: list[dict], todo: list[tuple[Group, Cell]], total: int, stream=None):
        self.costs: dict[tuple, list[float]] = defaultdict(list)
        for record in finished:
            self._add(record["_group_model"], record["method"], record["_group_column"], record["cost"]["wall_s"])
        self.todo = list(todo)
        self.total = total
        self.done = total - len(todo)
        self.stream = stream or sys.stderr
        self.started = time.monotonic()

    def _add(self, model: str, method: str, column: str, wall: float) -> None:
        self.costs[(model, column)].append(wall)
        self.costs[("*", method)].append(wall)

    def expected(self, group: Group, cell: Cell) -> float | None:
        for key in ((group.model, group.column(cell.method)), ("*", cell.method)):
            if self.costs.get(key):
                return float(np.mean(self.costs[key]))
        return None

    def eta(self) -> tuple[float, int]:
        """Seconds expected for the cells still to do, and how many of them have no estimate yet."""
        guesses = [self.expected(g, c) for g, c in self.todo]
        return float(sum(x for x in guesses if x is not None)), sum(x is None for x in guesses)

    def before(self, group: Group, cell: Cell, task_name: str) -> None:
        eta, unknown = self.eta()
        timed = len(self.todo) - unknown
        if unknown:
            eta_text = f"ETA {_fmt_duration(eta)} for {timed} cell(s) + {unknown} of methods not yet timed"
        else:
            eta_text = f"ETA {_fmt_duration(eta)}"
        guess = self.expected(group, cell)
        self.stream.write(
            f"[report {self.done + 1}/{self.total}] {_cell_label(group, cell, task_name)}: "
            f"~{_fmt_duration(guess)}; {eta_text}\n"
        )
        self.stream.flush()

    def after(self, group: Group, cell: Cell, record: dict) -> None:
        self._add(group.model, cell.method, group.column(cell.method), record["cost"]["wall_s"])
        self.todo = [(g, c) for g, c in self.todo if not (g is group and c == cell)]
        self.done += 1
        # Named: with --workers, the line before this one may be another cell's start.
        self.stream.write(
            f"[report {self.done}/{self.total}] {_cell_label(group, cell, Path(cell.task).name)} "
            f"done in {_fmt_duration(record['cost']['wall_s'])} "
            f"(cpu {record['cost']['cpu_s']:.0f} s), accuracy {100 * record['accuracy']:.1f}\n"
        )
        self.stream.flush()


def _cell_label(group: Group, cell: Cell, task_name: str) -> str:
    return f"{group.model} {task_name} seed {cell.seed} {column_label(group.column(cell.method))}"


def _seed_major(group: Group, seed: int, task: str) -> EvalSettings:
    return dataclasses.replace(group.settings, seeds=[seed], tasks=[task])


def finished_cells(groups: list[Group]) -> tuple[list[dict], list[tuple[Group, Cell]], int]:
    """(finished records tagged with their group, unfinished (group, cell) in run order, total cells)."""
    from ifedicl.evaluation.report import code_version

    stores = {g.name: CellStore(g.out_dir, g.settings, code_version()) for g in groups}
    finished, todo, total = [], [], 0
    for seed in groups[0].settings.seeds if groups else []:
        for model in dict.fromkeys(g.model for g in groups):
            for task in groups[0].settings.tasks:
                for g in (g for g in groups if g.model == model):
                    for cell in plan_cells(_seed_major(g, seed, task)):
                        total += 1
                        record = stores[g.name].get(cell)
                        if record is None:
                            todo.append((g, cell))
                        else:
                            tags = {"_group_model": g.model, "_group_objective": g.objective}
                            finished.append({**record, **tags, "_group_column": g.column(cell.method)})
    return finished, todo, total


def run_grid(
    spec: GridSpec,
    out: str | Path,
    command: str,
    max_cells: int | None = None,
    stream=None,
    workers: int = 1,
) -> dict:
    """Compute the grid's unfinished cells (at most ``max_cells``), seed-major; rewrite the report as blocks finish.

    ``workers`` > 1 computes that many cells at once, each in its own process (see :func:`_run_in_workers`).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = spec.groups(out)
    finished, todo, total = finished_cells(groups)
    progress = Progress(finished, todo, total, stream)
    chosen = todo if max_cells is None else todo[: max(0, max_cells)]
    rewrite = lambda: write_report(spec, out, command)  # noqa: E731
    if workers > 1 and len(chosen) > 1:
        computed = _run_in_workers(chosen, progress, rewrite, workers)
    else:
        computed = _run_in_process(chosen, progress, rewrite)
    results = write_report(spec, out, command)
    results["run"] = {"cells": total, "computed": computed, "resumed": total - len(todo)}
    return results


def _block(group: Group, cell: Cell) -> tuple:
    """The unit after which the report files are rewritten: (seed, model, task)."""
    return cell.seed, group.model, cell.task


def _run_in_process(chosen: list[tuple[Group, Cell]], progress: Progress, rewrite) -> int:
    """Compute ``chosen`` here, one (model, task, seed) block at a time, with one Ray for every federated cell."""
    from ifedicl.evaluation.runner import run_cells

    started_ray = False
    if any(c.method in FEDERATED for _, c in chosen):
        from ifedicl.federation_job.driver import ensure_ray

        started_ray = ensure_ray()  # one Ray for the whole report (run_cells reuses it)
    computed = 0
    try:
        for block in dict.fromkeys(_block(g, c) for g, c in chosen):
            in_block = [(g, c) for g, c in chosen if _block(g, c) == block]
            for g in {id(g): g for g, _ in in_block}.values():  # each group once, in order
                _, _, stats = run_cells(
                    _seed_major(g, block[0], block[2]),
                    g.out_dir,
                    before_cell=lambda cell, name, g=g: progress.before(g, cell, name),
                    after_cell=lambda cell, name, record, g=g: progress.after(g, cell, record),
                    max_cells=sum(gg is g for gg, _ in in_block),
                )
                computed += stats["computed"]
            rewrite()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return computed


def compute_cell(settings: EvalSettings, out_dir: Path, cell: Cell) -> dict:
    """Compute one cell of a group in this process (a report worker) and return its record.

    The group's settings narrowed to the cell keep its settings hash, so the cell file is the
    one the serial report would write. A federated cell starts and stops its own Ray.
    """
    from ifedicl.evaluation.runner import run_cells

    alphas = settings.alphas if cell.alpha is None else [cell.alpha]
    narrowed = dataclasses.replace(settings, tasks=[cell.task], seeds=[cell.seed], methods=[cell.method], alphas=alphas)
    records, _, stats = run_cells(narrowed, out_dir)
    if stats["cells"] != 1 or not records:
        raise RuntimeError(f"cell {cell.key} did not finish ({stats})")
    return records[0]


def _quiet_worker() -> None:
    """Workers share one terminal: their progress bars would interleave, so only the parent reports."""
    import os

    os.environ["TQDM_DISABLE"] = "1"


def next_startable(pending: list[tuple[Group, Cell]], running: list[Cell]) -> int | None:
    """Index of the first pending cell that may start now: a federated cell only while no other runs
    (each starts its own Ray and ten client actors; two at once would double the peak memory)."""
    federation_running = any(c.method in FEDERATED for c in running)
    for i, (_, cell) in enumerate(pending):
        if cell.method not in FEDERATED or not federation_running:
            return i
    return None


def _run_in_workers(chosen: list[tuple[Group, Cell]], progress: Progress, rewrite, workers: int) -> int:
    """Compute ``chosen`` in ``workers`` processes, in seed-major order as far as the federated-cell rule allows.

    Every cell is independent (its own file, written atomically by the worker), so the order only
    decides which table fills first; the report files are rewritten here, in this process alone,
    whenever a block's last cell has finished. A cell that fails stops the report after the cells
    already running have finished and been saved.
    """
    import multiprocessing
    from collections import Counter
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = list(chosen)
    left_in_block = Counter(_block(g, c) for g, c in pending)
    running: dict = {}  # future -> (group, cell)
    computed = 0
    context = multiprocessing.get_context("spawn")  # torch and Ray threads do not survive fork
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_quiet_worker)
    try:
        while pending or running:
            while pending and len(running) < workers:
                index = next_startable(pending, [c for _, c in running.values()])
                if index is None:
                    break
                group, cell = pending.pop(index)
                progress.before(group, cell, Path(cell.task).name)
                running[pool.submit(compute_cell, group.settings, group.out_dir, cell)] = (group, cell)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                group, cell = running.pop(future)
                record = future.result()
                computed += 1
                progress.after(group, cell, record)
                left_in_block[_block(group, cell)] -= 1
                if left_in_block[_block(group, cell)] == 0:
                    rewrite()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return computed


# ---------------------------------------------------------------------------------------------- the report files


def _summaries(groups: list[Group]) -> tuple[list[dict], dict]:
    """All finished cell records, and {model: {task: {column: summary}}} (mean ± std over finished seeds)."""
    from ifedicl.evaluation.report import _summarize_method

    records, _, _ = finished_cells(groups)
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        grouped[(r["_group_model"], r["task"], r["_group_column"])].append(r)
    summary: dict = {}
    for (model, task, column), rows in grouped.items():
        s = _summarize_method(rows)
        costs = [r["cost"] for r in rows]
        s["cost"] = {
            "cells": len(rows),
            "wall_s_mean": float(np.mean([c["wall_s"] for c in costs])),
            "cpu_s_mean": float(np.mean([c["cpu_s"] for c in costs])),
            "wall_s_total": float(np.sum([c["wall_s"] for c in costs])),
            "cpu_s_total": float(np.sum([c["cpu_s"] for c in costs])),
        }
        s["code_versions"] = sorted({str(r.get("code_version")) for r in rows})
        summary.setdefault(model, {}).setdefault(task, {})[column] = s
    return records, summary


def columns_of(spec: GridSpec) -> list[str]:
    out = [m for m in PROMPT_ONLY if m in spec.methods]
    for m in TRAINABLE:
        if m in spec.methods:
            out += [_column(m, o) for o in spec.objectives]
    return out


BFLOAT16_NOTE = (
    "Precision: the frozen model computes in bfloat16 (Λ, the LoRA adapters, the vector sums and the optimizers "
    "stay float32), about half the CPU seconds of float32, so the grid fits the CPU budget; every method shares it. "
    "In `docs/ablation` the `bfloat16 model` cells scored what float32 scored on SmolLM2 × Subj (seeds 0 and 1) "
    "and 1.5 points less on Emotion (seed 0: 44.0 vs 45.5, the same curve until the last round)."
)

# What `ifedicl report` computes with unless --dtype/--rounds/--local-epochs say otherwise (the ablation's:
# ABLATION_DEFAULTS). bfloat16: in docs/ablation the "bfloat16 model" cells scored what float32 scored on Subj
# (both seeds) and 1.5 points less on Emotion, at about half the client CPU seconds (BFLOAT16_NOTE). The budget
# is 3 passes over each client's data as 12 rounds × ¼ epoch, not 3 × 1 (RECIPE_NOTE).
REPORT_DEFAULTS = {"dtype": "bfloat16", "rounds": 12, "local_epochs": 0.25}

RECIPE_NOTE = (
    "Rounds: IFed-ICL and FedAvg-LoRA run 12 rounds × ¼ local epoch (each round trains on the next quarter of "
    "every shard), the same 3 passes over each client's data as 3 rounds × 1 epoch, and I2CL central and "
    "local-only train those 3 passes: in `docs/ablation-bfloat16` (SmolLM2, label-only, seeds 0–2) 12 × ¼ "
    "scored higher than 3 × 1 on Subj (76.2 ± 2.2 vs 71.2 ± 5.1), Emotion (45.5 vs 44.3) and AG News (82.7 vs "
    "80.8), higher or equal in 8 of 9 (task, seed) pairs, at the same client CPU seconds; 24 rounds × ⅛ scored "
    "the same within noise (76.0 ± 4.3, 46.0, 83.0; +0.2 points over the 9 pairs) at 1.1× the client CPU seconds."
)

DIFFERENCES = [
    "Models: SmolLM2-135M-Instruct and Gemma-3-270M (4-bit GGUF weights dequantized to float32), not Llama-3-8B / "
    "Qwen2.5-7B: the 8B models do not fit this project's CPU budget; absolute accuracies are therefore lower and "
    "a 135M/270M model may lack the features a task needs.",
    "Training data: `max_train` examples per task (the paper: 5,000) and a class-balanced test sample of "
    "`test_size` (the paper: 500), chosen so the whole report runs in hours on CPUs; the split is the paper's "
    "(10 clients, Dirichlet α=0.5).",
    "Seeds: mean ± std over the seeds listed (split, demonstrations, client sampling, training order); the test "
    "sample is fixed across seeds.",
    "Objective: every trainable method is reported under both losses (full-vocabulary cross-entropy, I2CL's; "
    "label-word-only cross-entropy), the paper reports I2CL's objective for IFed-ICL.",
    "Budget parity: I2CL central and local-only calibration run rounds × local epochs passes over their data, the "
    "passes a federated client makes; FedAvg-LoRA (rank 8 on q/v) uses the same rounds and local epochs as IFed-ICL.",
    "Training noise: the Λ methods calibrate with I2CL's training-only noise (1e-3 × the block output's norm) on "
    "SmolLM2 and with 1e-4 on Gemma 3, whose normalized block outputs do not tolerate 1e-3: centralized I2CL on "
    "Gemma-3-270M × Subj (seed 0, `docs/ablation-gemma`) scored 66.5% label-only and 50.0% full-vocab with 1e-3, "
    "below zero-shot (68.0), and 85.0% / 81.0% with 1e-4 (85.0 / 80.5 without noise).",
]


def _pct(s: dict | None, seeds: int) -> str:
    if s is None:
        return "–"
    text = f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}"
    n = len(s["seeds"])
    return text if n >= seeds else f"{text} ({n}/{seeds} seeds)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def render_report(results: dict) -> str:
    spec, summary = results["spec"], results["summary"]
    columns = results["columns"]
    seeds = len(spec["seeds"])
    base = spec["base"]
    lines = [
        "# IFed-ICL report: the paper's table on real models",
        "",
        "Reproduce (resumes from the committed cells; a finished cell is never recomputed):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Code version of this summary: `{results['code_version']}`; the cells were computed with "
        + ", ".join(f"`{v}`" for v in results["cell_code_versions"])
        + f". Written {results['created']}.  ",
        f"Progress: {results['finished']}/{results['total']} cells finished "
        f"({_fmt_duration(results['cost']['wall_s'])} wall, {results['cost']['cpu_s'] / 3600:.2f} CPU hours so far).",
        "",
        "## Settings",
        "",
        f"Models {', '.join(f'`{m}`' for m in spec['models'])}; tasks {', '.join(_safe(t) for t in spec['tasks'])}; "
        f"seeds {spec['seeds']}; objectives {spec['objectives']}.  ",
        ", ".join(f"{k}={v}" for k, v in sorted(base.items())) + ".",
        "",
        "What differs from the paper, and why:",
        "",
        *[f"- {d}" for d in DIFFERENCES],
        *([f"- {BFLOAT16_NOTE}"] if base.get("dtype") == "bfloat16" else []),
        *([f"- {RECIPE_NOTE}"] if all(base.get(k) == REPORT_DEFAULTS[k] for k in ("rounds", "local_epochs")) else []),
        "",
        "## Accuracy (%), mean ± std over seeds",
        "",
    ]
    header = ["model", "task"] + [column_label(c) for c in columns]
    rows = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            rows.append([model, task] + [_pct(by_col.get(c), seeds) for c in columns])
    lines += _table(header, rows)
    lines += ["", "## What each cell cost: mean wall seconds / mean CPU seconds per cell (all clients)", ""]
    rows = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            rows.append(
                [model, task]
                + [
                    f"{by_col[c]['cost']['wall_s_mean']:.0f} / {by_col[c]['cost']['cpu_s_mean']:.0f}"
                    if c in by_col
                    else "–"
                    for c in columns
                ]
            )
    lines += _table(header, rows)
    lines += [
        "",
        "Wall: the cell's elapsed time on this machine (shared, so an upper bound). CPU: this process's CPU seconds "
        "plus, for IFed-ICL and FedAvg-LoRA, the CPU seconds every client actor measured for its own requests.",
        "",
        "## Client compute and bytes, IFed-ICL vs FedAvg-LoRA (per client, mean over seeds)",
        "",
    ]
    rows = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            for objective in spec["objectives"]:
                ifed, lora = by_col.get(f"ifedicl@{objective}"), by_col.get(f"fedavg_lora@{objective}")
                if not (ifed and lora):
                    continue
                up_i, up_l = ifed["comm"]["round_up_per_client"], lora["comm"]["round_up_per_client"]
                cpu_i, cpu_l = ifed["client_cpu_seconds_mean"], lora["client_cpu_seconds_mean"]
                rows.append(
                    [
                        model,
                        task,
                        objective,
                        f"{cpu_i:.1f}",
                        f"{cpu_l:.1f}",
                        f"{cpu_l / cpu_i:.1f}×" if cpu_i else "–",
                        f"{ifed['comm']['stage1_up_per_client']:.0f}",
                        f"{up_i:.0f}",
                        f"{up_l:.0f}",
                        f"{up_l / up_i:,.0f}×" if up_i else "–",
                    ]
                )
    lines += _table(
        [
            "model",
            "task",
            "objective",
            "IFed-ICL client CPU s",
            "FedAvg-LoRA client CPU s",
            "ratio",
            "IFed-ICL stage-1 up B",
            "IFed-ICL up B/round",
            "LoRA up B/round",
            "ratio",
        ],
        rows,
    )
    lines += ["", "## Targets (issue 11), on the finished cells", ""]
    rows = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            for objective in spec["objectives"]:
                ifed = by_col.get(f"ifedicl@{objective}")
                if ifed is None:
                    continue
                acc = ifed["accuracy_mean"]

                def beats(col: str, acc=acc, by_col=by_col) -> str:
                    other = by_col.get(col)
                    return "–" if other is None else ("yes" if acc > other["accuracy_mean"] else "no")

                central = by_col.get(f"i2cl_central@{objective}")
                local = by_col.get(f"local_calibration@{objective}")
                rows.append(
                    [
                        model,
                        task,
                        objective,
                        beats("zero_shot"),
                        beats("local_icl"),
                        beats(f"fedavg_lora@{objective}"),
                        "–" if central is None else f"{100 * (acc - central['accuracy_mean']):+.1f}",
                        "–" if local is None else f"{100 * (acc - local['accuracy_mean']):+.1f}",
                    ]
                )
    lines += _table(
        [
            "model",
            "task",
            "objective",
            "> zero-shot",
            "> local ICL",
            "> FedAvg-LoRA",
            "vs I2CL central (target ≥ −1)",
            "global − local-only (target ≥ +10.7)",
        ],
        rows,
    )
    lines += [
        "",
        "Per group (model × objective), the harness's own tables (communication, client compute, global vs local "
        "coefficients, accuracy after every round) and plots:",
        "",
    ]
    lines += [f"- [{g}]({g}/results.md)" for g in results["groups"]]
    return "\n".join(lines) + "\n"


# The ablation's recipes were measured against float32 stage-1 coding, the default until this ablation chose
# int8: its base keeps float32, so each variant differs from "default" by its one change ("stage 1 coded int8"
# is the int8 row) and the cells computed before the switch stay current.
ABLATION_BASE: dict = {"federation": {"vector_coding": "float32"}}
# Its cells' model dtype and budget unless --dtype/--rounds/--local-epochs say otherwise: the recipe every
# variant was first measured against (the report's own: REPORT_DEFAULTS).
ABLATION_DEFAULTS = {"dtype": "float32", "rounds": 3, "local_epochs": 1.0}

ABLATION_VARIANTS: dict[str, dict] = {
    # The client compute budget is fixed at the base's rounds × local epochs passes over each client's data;
    # every variant keeps it (or, for stage 1, spends less). Each row states its measured client CPU.
    "default": {},
    "1 round × 3 epochs": {"rounds": 1, "local_epochs": 3},
    "one schedule across rounds": {"recipe": {"schedule": "global"}},
    "lr 3e-3": {"recipe": {"lr": 3e-3}},
    "lr 3e-2": {"recipe": {"lr": 3e-2}},
    "calib batch 1": {"recipe": {"batch_size": 1}},
    "calib batch 8": {"recipe": {"batch_size": 8}},
    "weighted means": {"weighted": True},
    "attention only": {"recipe": {"modules": "attn"}},
    "MLP only": {"recipe": {"modules": "mlp"}},
    "stage 1: 5 examples per client": {"recipe": {"stage1_examples": 5}},
    "stage 1: 20 examples per client": {"recipe": {"stage1_examples": 20}},
    "stage 1 coded float16": {"federation": {"vector_coding": "float16"}},
    "stage 1 coded int8": {"federation": {"vector_coding": "int8"}},
    "12 rounds × ¼ epoch": {"rounds": 12, "local_epochs": 0.25},
    "24 rounds × ⅛ epoch": {"rounds": 24, "local_epochs": 0.125},
    # FedAvgM's server learning rate (no momentum): each round Λ moves 3× the clients' mean move, at no client cost.
    "server lr 3": {"federation": {"server_lr": 3.0}},
    # Not a recipe change but the report's cost: the same cell with the frozen model in bfloat16 (Λ, the
    # vectors' mean and the optimizer stay float32); ~2.4x faster forward+backward on AVX512-bf16 CPUs.
    "bfloat16 model": {"dtype": "bfloat16"},
    # Item 6: the recalibration after the default federation, on a new split of the clients' data, from the
    # live Λ or from scratch (same rounds, same client compute; the cell's client CPU is the recalibration's).
    "recalibration: warm start": {"recipe": {"recalibrate": "warm"}},
    "recalibration: cold start": {"recipe": {"recalibrate": "cold"}},
    "label-prior correction": {"recipe": {"prior_correction": True}},
    # I2CL's training-only noise on the block outputs; the default is the model family's (1e-3, Gemma 3: 1e-4).
    "training noise 1e-3": {"recipe": {"noise_scale": 1e-3}},
    "training noise 1e-4": {"recipe": {"noise_scale": 1e-4}},
    "no training noise": {"recipe": {"noise_scale": 0.0}},
    # Issue 30's candidates. A second-order round: clients send the label-only loss's gradient and Gauss-Newton
    # matrix on their round's window, the server takes a trust-region step on the pooled objective.
    "gauss-newton": {"federation": {"stage2": "gauss-newton"}},
    "gauss-newton 4 rounds": {"rounds": 4, "federation": {"stage2": "gauss-newton"}},
    # Server optimizers on the aggregate's change (FedAdam: every coefficient moves ~lr per round; FedAvgM).
    "server adam lr 0.02": {"federation": {"server_optimizer": "adam", "server_lr": 0.02, "server_decay": "cosine"}},
    "server momentum 0.8": {
        "federation": {"server_optimizer": "momentum", "server_momentum": 0.8, "server_decay": "cosine"}
    },
    "class-balanced stage 1": {"federation": {"stage1": "class-balanced"}},
    "prior correction + weighted + 12 × ¼": {
        "rounds": 12,
        "local_epochs": 0.25,
        "weighted": True,
        "recipe": {"prior_correction": True},
    },
}


def render_ablation(results: dict) -> str:
    spec, summary = results["spec"], results["summary"]
    lines = [
        "# IFed-ICL recipe ablation",
        "",
        "Reproduce (resumes from the committed cells):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Code version `{results['code_version']}`; cells computed with "
        + ", ".join(f"`{v}`" for v in results["cell_code_versions"])
        + f". Written {results['created']}. {results['finished']}/{results['total']} cells finished.  ",
        f"Base settings: {', '.join(f'{k}={v}' for k, v in sorted(spec['base'].items()))}; seeds {spec['seeds']}.",
        "Each variant changes one thing from the default recipe (I2CL's: AdamW lr 1e-2, batch 2, warm-up + cosine "
        "restarted every round, unweighted means, both blocks, every local example in stage 1, float32 stage-1 "
        "coding). The client budget "
        "is the base's rounds × local epochs passes over each client's data; the cell shows accuracy (%, mean ± std "
        "over seeds) / mean client CPU seconds per client (all rounds, measured in the actors).",
        "",
    ]
    keys = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            for col in by_col:
                base_col = col.partition("#")[0]
                if (model, task, base_col) not in keys:
                    keys.append((model, task, base_col))
    header = ["variant"] + [f"{m} {t} {column_label(c)}" for m, t, c in keys]
    rows = []
    for variant in spec["variants"]:
        row = [variant]
        for model, task, col in keys:
            s = summary[model][task].get(f"{col}#{variant}")
            row.append("–" if s is None else f"{_pct(s, len(spec['seeds']))} / {s['client_cpu_seconds_mean']:.0f} s")
        rows.append(row)
    lines += _table(header, rows)
    return "\n".join(lines) + "\n"


def write_report(spec: GridSpec, out: str | Path, command: str) -> dict:
    """results.json and results.md at ``out`` and per group, all from the cell files alone."""
    import datetime as dt

    from ifedicl.evaluation.plots import write_plots
    from ifedicl.evaluation.report import code_version, write_results
    from ifedicl.kernel.modeling import canonical_model_id

    out = Path(out)
    groups = spec.groups(out)
    records, summary = _summaries(groups)
    group_names = []
    for g in groups:
        mine = [
            {k: v for k, v in r.items() if not k.startswith("_group")}
            for r in records
            if (r["_group_model"], r["_group_objective"]) == (g.model, g.objective)
            and r["_group_column"] == g.column(r["method"])
        ]
        if not mine:
            continue
        stats = {"cells": len(plan_cells(g.settings)), "resumed": len(mine), "computed": 0}
        try:
            model_id = canonical_model_id(g.model)
        except Exception:  # noqa: BLE001  a model not installed here: the summary is still rendered from cells
            model_id = g.model
        res = write_results(mine, g.settings, model_id, g.out_dir, stats)
        res["plots"] = [str(Path(p).relative_to(out)) for p in write_plots(res, g.out_dir)]
        write_atomic(g.out_dir / "results.json", json.dumps(res, indent=1, default=float))
        group_names.append(str(g.out_dir.relative_to(out)))
    _, _, total = finished_cells(groups)
    costs = [r["cost"] for r in records]
    results = {
        "command": command,
        "code_version": code_version(),
        "cell_code_versions": sorted({str(r.get("code_version")) for r in records}),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
        "columns": columns_of(spec),
        "task_names": list(dict.fromkeys(r["task"] for r in records)),
        "finished": len(records),
        "total": total,
        "cost": {
            "wall_s": float(sum(c["wall_s"] for c in costs)),
            "cpu_s": float(sum(c["cpu_s"] for c in costs)),
        },
        "groups": group_names,
        "summary": summary,
    }
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=float))
    ablation = list(spec.variants) != [""]
    write_atomic(out / "results.md", (render_ablation if ablation else render_report)(results))
    return results
