"""The loop over cells: load the model once, skip finished cells, run the rest with progress bars.

Every finished cell records what it cost (``cost``): its wall seconds, the CPU seconds of
this process (the in-process methods' work, and the scoring) and, for the Ray federations,
the CPU seconds the client actors measured themselves (:mod:`ifedicl.federation_job.compute`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ifedicl.evaluation import methods_i2cl, methods_icl, methods_lora
from ifedicl.evaluation.cells import CellStore
from ifedicl.evaluation.context import MethodContext
from ifedicl.evaluation.settings import FEDERATED, Cell, EvalSettings, plan_cells, rounds_to_score
from ifedicl.evaluation.tasks import PreparedTask, prepare_task

log = logging.getLogger("ifedicl.eval")

METHOD_FUNCTIONS = {
    "zero_shot": methods_icl.zero_shot,
    "few_shot_icl": methods_icl.few_shot_icl,
    "local_icl": methods_icl.local_icl,
    "i2cl_central": methods_i2cl.i2cl_central,
    "local_calibration": methods_i2cl.local_calibration,
    "fedavg_lora": methods_lora.fedavg_lora,
    "ifedicl": methods_i2cl.ifedicl,
}

# Called before each cell is computed (cell, task name) and after it finished (cell, task name, record).
CellHook = Callable[..., None]

_MODELS: dict[tuple[str, str], tuple] = {}  # (model id, dtype) -> (model, ctx, tokenizer): the last one loaded


def _load_context(settings: EvalSettings, out_dir: Path) -> MethodContext:
    """The frozen model for the in-process methods; kept across calls (a report runs many groups of cells)."""
    from ifedicl.kernel.modeling import canonical_model_id, load_model, load_tokenizer
    from ifedicl.model_patches.hf import HFContextModel

    model_id = canonical_model_id(settings.model)
    key = (model_id, settings.dtype)
    if key not in _MODELS:
        for _, ctx, _ in _MODELS.values():
            ctx.remove_hooks()
        _MODELS.clear()
        model = load_model(model_id, settings.dtype)
        _MODELS[key] = (model, HFContextModel(model), load_tokenizer(model_id))
    model, ctx, tokenizer = _MODELS[key]
    return MethodContext(settings, model_id, model, ctx, tokenizer, out_dir)


def cell_cost(wall_s: float, process_cpu_s: float, result: dict) -> dict:
    """What a cell cost: wall seconds, this process's CPU seconds, the client actors' CPU seconds (all clients)."""
    client_cpu = float(result.get("client_compute", {}).get("client_cpu_seconds", 0.0))
    return {
        "wall_s": round(wall_s, 3),
        "process_cpu_s": round(process_cpu_s, 3),
        "actors_cpu_s": round(client_cpu, 3),
        "cpu_s": round(process_cpu_s + client_cpu, 3),
    }


def run_cells(
    settings: EvalSettings,
    out_dir: str | Path,
    before_cell: CellHook | None = None,
    after_cell: CellHook | None = None,
    max_cells: int | None = None,
) -> tuple[list[dict], dict[str, PreparedTask], dict]:
    """Compute every unfinished cell (at most ``max_cells``); return the finished cell records, the tasks, run stats.

    Stats say how many cells were computed and how many were resumed from disk.
    """
    from ifedicl.evaluation.report import code_version

    settings.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = CellStore(out_dir, settings, code_version())
    cells = plan_cells(settings)
    tasks = {
        loc: prepare_task(loc, settings.max_train, settings.test_size, settings.test_seed, settings.data)
        for loc in settings.tasks
    }
    records: dict[Cell, dict] = {c: r for c in cells if (r := store.get(c)) is not None}
    todo = [c for c in cells if c not in records]
    if max_cells is not None:
        todo = todo[: max(0, max_cells)]
    topup = [c for c in records if rounds_to_score(settings, records[c])]
    stats = {"cells": len(cells), "resumed": len(records), "computed": 0}
    if todo or topup:
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        mc = _load_context(settings, out_dir)
    if topup:
        stats["topped_up"] = len(topup)
        for cell in topup:
            records[cell] = store.replace(cell, methods_i2cl.score_kept_rounds(mc, tasks[cell.task], records[cell]))
    if todo:
        started_ray = False
        if any(c.method in FEDERATED for c in todo):
            from ifedicl.federation_job.driver import ensure_ray  # one Ray for all federation cells

            started_ray = ensure_ray()
        try:
            with tqdm(total=len(cells), initial=len(records), desc="eval cells", unit="cell") as bar:
                for cell in todo:
                    task = tasks[cell.task]
                    bar.set_postfix_str(f"{cell.method} {task.name} α={cell.alpha} seed={cell.seed}")
                    if before_cell is not None:
                        before_cell(cell, task.name)
                    start, cpu = time.monotonic(), time.process_time()
                    result = METHOD_FUNCTIONS[cell.method](mc, task, cell)
                    result["cell_seconds"] = time.monotonic() - start
                    result["cost"] = cell_cost(result["cell_seconds"], time.process_time() - cpu, result)
                    records[cell] = store.put(cell, task.name, result)
                    stats["computed"] += 1
                    bar.update(1)
                    if after_cell is not None:
                        after_cell(cell, task.name, records[cell])
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    return [records[c] for c in cells if c in records], tasks, stats


def evaluate(settings: EvalSettings, out_dir: str | Path) -> dict:
    """Run (or resume) the whole evaluation and write results.json, results.md and the PNGs."""
    from ifedicl.evaluation.plots import write_plots
    from ifedicl.evaluation.report import write_results
    from ifedicl.kernel.modeling import canonical_model_id

    records, _, stats = run_cells(settings, out_dir)
    results = write_results(records, settings, canonical_model_id(settings.model), out_dir, stats)
    results["plots"] = [str(p) for p in write_plots(results, out_dir)]
    (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=1, default=float))  # now with plots
    return results
