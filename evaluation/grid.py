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

This module schedules and collects; the rest is below it: the progress lines and ETA in
:mod:`~ifedicl.evaluation.progress`, the markdown in :mod:`~ifedicl.evaluation.render`, the
column names in :mod:`~ifedicl.evaluation.columns` and the report's and the ablation's
defaults and variants in :mod:`~ifedicl.evaluation.variants`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ifedicl.evaluation.cells import CellStore, write_atomic
from ifedicl.evaluation.columns import TRAINABLE, column_key, columns_of, safe_name
from ifedicl.evaluation.comparison import paired_differences
from ifedicl.evaluation.progress import Progress
from ifedicl.evaluation.render import render_ablation, render_report
from ifedicl.evaluation.settings import FEDERATED, METHODS, Cell, EvalSettings, plan_cells, rounds_to_score


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
        return column_key(method, self.objective) + (f"#{self.variant}" if self.variant else "")


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
    # The task names (a location's last component) a model is reported on, where not every task: a model
    # missing here gets them all.
    model_tasks: dict[str, list[str]] = field(default_factory=dict)

    def tasks_of(self, model: str) -> list[str]:
        if model not in self.model_tasks:
            return list(self.tasks)
        return [t for t in self.tasks if safe_name(t) in self.model_tasks[model]]

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
                        tasks=self.tasks_of(model),
                        seeds=list(self.seeds),
                        methods=methods,
                        objective=objective,
                        **fields,
                    )
                    settings.validate()
                    folder = out / safe_name(model) / objective
                    folder = folder / safe_name(variant) if variant else folder
                    groups.append(Group(model, objective, settings, folder, variant))
        return groups

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _seed_major(group: Group, seed: int, task: str) -> EvalSettings:
    return dataclasses.replace(group.settings, seeds=[seed], tasks=[task])


def finished_cells(groups: list[Group]) -> tuple[list[dict], list[tuple[Group, Cell]], int]:
    """(finished records tagged with their group, unfinished (group, cell) in run order, total cells)."""
    from ifedicl.evaluation.report import code_version

    stores = {g.name: CellStore(g.out_dir, g.settings, code_version()) for g in groups}
    finished, todo, total = [], [], 0
    for seed in groups[0].settings.seeds if groups else []:
        for model in dict.fromkeys(g.model for g in groups):
            mine = [g for g in groups if g.model == model]
            for task in mine[0].settings.tasks:
                for g in mine:
                    for cell in plan_cells(_seed_major(g, seed, task)):
                        total += 1
                        record = stores[g.name].get(cell)
                        if record is None or rounds_to_score(g.settings, record):  # to compute, or to top up
                            todo.append((g, cell))
                        else:
                            tags = {"_group_model": g.model, "_group_objective": g.objective}
                            finished.append({**record, **tags, "_group_column": g.column(cell.method)})
    return finished, todo, total


CELL_ORDERS = ("seed", "model")


def in_order(todo: list[tuple[Group, Cell]], order: str, models: list[str]) -> list[tuple[Group, Cell]]:
    """``todo`` (seed-major, as :func:`finished_cells` gives it) in the run order ``order`` names; ``models``: the
    grid's, in the order given (not their first cell's: a model whose seed 0 is done would go last)."""
    if order not in CELL_ORDERS:
        raise ValueError(f"order must be one of {CELL_ORDERS} (got {order!r})")
    if order == "seed":
        return list(todo)
    return sorted(todo, key=lambda group_cell: models.index(group_cell[0].model))  # stable: seed-major within


def run_grid(
    spec: GridSpec,
    out: str | Path,
    command: str,
    max_cells: int | None = None,
    stream=None,
    workers: int = 1,
    order: str = "seed",
) -> dict:
    """Compute the grid's unfinished cells (at most ``max_cells``); rewrite the report as blocks finish.

    ``order``: ``seed`` computes seed-major, so every table fills evenly; ``model`` finishes the models in the
    order given (seed-major within each), so one model's comparison is complete first while, with ``workers``
    > 1, the next model's cells that train alone fill the workers the one-at-a-time federated cells leave idle.
    ``workers`` > 1 computes that many cells at once, each in its own process (see :func:`_run_in_workers`).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = spec.groups(out)
    finished, todo, total = finished_cells(groups)
    todo = in_order(todo, order, spec.models)
    progress = Progress(finished, todo, total, stream, workers=workers)
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


def _normalized(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def is_part_of(spec: GridSpec, whole: GridSpec) -> bool:
    """Every cell of ``spec`` is a cell of ``whole``, under the same shared settings."""
    axes = ("models", "tasks", "seeds", "objectives", "methods")
    return (
        all(set(getattr(spec, axis)) <= set(getattr(whole, axis)) for axis in axes)
        and all(name in whole.variants and _normalized(v) == _normalized(whole.variants[name])
                for name, v in spec.variants.items())  # fmt: skip
        and all(set(spec.tasks_of(m)) <= set(whole.tasks_of(m)) for m in spec.models)
        and _normalized(spec.base) == _normalized(whole.base)
    )


def report_grid(spec: GridSpec, out: Path, command: str) -> tuple[GridSpec, str]:
    """The grid (and its command) that ``out``'s report files show: the folder's recorded grid when ``spec`` is
    part of it, else ``spec``. So a run narrowed to some methods, tasks, seeds or variants computes only those
    and never drops the rest from the report; a new grid (wider, or other settings) replaces the recorded one,
    and a smaller report is a new ``--out``."""
    try:
        recorded = json.loads((out / "results.json").read_text())
        whole = GridSpec(**recorded["spec"])
    except (OSError, ValueError, KeyError, TypeError):  # no report yet, or not one this code wrote
        return spec, command
    return (whole, recorded.get("command", command)) if is_part_of(spec, whole) else (spec, command)


def write_report(spec: GridSpec, out: str | Path, command: str) -> dict:
    """results.json and results.md at ``out`` and per group, all from the cell files alone, over the grid
    :func:`report_grid` names."""
    import datetime as dt

    from ifedicl.evaluation.plots import write_plots
    from ifedicl.evaluation.report import code_version, write_results
    from ifedicl.kernel.modeling import canonical_model_id

    out = Path(out)
    spec, command = report_grid(spec, out, command)
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
        "columns": columns_of(spec.methods, spec.objectives),
        "task_names": list(dict.fromkeys(r["task"] for r in records)),
        "finished": len(records),
        "total": total,
        "cost": {
            "wall_s": float(sum(c["wall_s"] for c in costs)),
            "cpu_s": float(sum(c["cpu_s"] for c in costs)),
        },
        "groups": group_names,
        "summary": summary,
        "paired": paired_differences(records),
    }
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=float))
    ablation = list(spec.variants) != [""]
    write_atomic(out / "results.md", (render_ablation if ablation else render_report)(results))
    return results
