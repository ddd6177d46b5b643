"""``ifedicl report``: the issue-11 report, ``ifedicl eval`` over models × tasks × seeds × objectives.

Thin: the grid (:mod:`ifedicl.evaluation.grid`) runs the eval harness's own cells,
resumable one JSON per cell under ``--out``. Its defaults are the report's grid; ``make
report`` runs it. Registered by the main CLI as ``ifedicl report``.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import typer

from ifedicl.cli.option_sets import option_set
from ifedicl.evaluation.variants import REPORT_MODELS, REPORT_TASKS
from ifedicl.federation_job.options import Dtype

CellOrder = Literal["seed", "model"]  # evaluation.grid.CELL_ORDERS, without importing the grid for --help


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class GridSizes:
    """The shape every cell of the report and the ablation shares: the issue-11 settings (10 clients, α 0.5,
    600 train, 200 balanced test; rounds and local epochs per command), and how this process runs (threads,
    session bounds)."""

    data_dir: Path = Path("../shared/data")
    clients: int = 10
    alpha: float = 0.5
    rounds: int | None = None
    local_epochs: float | None = None
    test_size: int | None = None  # None: the command's (the report's 500, the ablation's 200)
    max_train: int = 600
    shots: int = 4
    batch_size: int = 16
    threads: int = 1
    dtype: Dtype | None = None  # None: the command's (the report's or the ablation's recipe)
    inference_dtype: Dtype | None = None  # None: --dtype
    workers: int = 1
    order: CellOrder = "seed"
    max_cells: int | None = None
    render_only: bool = False

    def base(self, defaults: dict) -> dict:
        """The EvalSettings fields of every cell (``defaults``: the command's dtype, rounds and local epochs,
        where the options do not say)."""
        return dict(
            threads=self.threads or None,
            dtype=self.dtype or defaults["dtype"],
            inference_dtype=self.inference_dtype or None,
            clients=self.clients,
            alphas=[self.alpha],
            rounds=defaults["rounds"] if self.rounds is None else self.rounds,
            local_epochs=defaults["local_epochs"] if self.local_epochs is None else self.local_epochs,
            test_size=defaults["test_size"] if self.test_size is None else self.test_size,
            max_train=self.max_train or None,
            shots=self.shots,
            batch_size=self.batch_size,
        )

    def spec(
        self, models: str, tasks: str, seeds: int, objectives: str, methods: str, defaults=None, **extra
    ):
        """The grid of cells: comma-separated models, task names under ``data_dir``, objectives and methods;
        ``defaults``: the command's dtype and budget (the report's, :data:`REPORT_DEFAULTS`, unless given)."""
        from ifedicl.evaluation.grid import GridSpec
        from ifedicl.evaluation.variants import REPORT_DEFAULTS

        return GridSpec(
            models=_csv(models),
            tasks=[str(self.data_dir / t) for t in _csv(tasks)],
            seeds=list(range(seeds)),
            objectives=_csv(objectives),
            methods=_csv(methods),
            base=self.base(defaults or REPORT_DEFAULTS),
            **extra,
        )


grid_options = option_set(
    GridSizes,
    {
        "data_dir": "one task directory per task",
        "clients": "federated clients",
        "alpha": "Dirichlet label-skew α",
        "rounds": "federated rounds (default: the report's recipe, 3 for the ablation)",
        "local_epochs": "local epochs per round, a fraction f < 1: the next f of each shard per round (default: the "
        "report's recipe, 1 for the ablation)",
        "test_size": "class-balanced test examples (default: 500 for the report, 200 for the ablation)",
        "max_train": "training examples used (0: all)",
        "shots": "demonstrations in few-shot and local ICL prompts",
        "batch_size": "inference batch size",
        "threads": "torch threads in the driver (0: torch's default); 1 is fastest when shared",
        "dtype": "model dtype of every cell (default: float32; bfloat16 only on a CPU with bf16 kernels)",
        "inference_dtype": "dtype of the prompt-only methods (default: --dtype, as the rest)",
        "workers": "cells computed at once, each in its own process (federated cells one at a time)",
        "order": "seed: seed-major, every table fills evenly; model: the models in the order given, each complete "
        "before the next (with --workers > 1 the next model's cells that train alone run beside the federated ones)",
        "max_cells": "compute at most this many cells, then stop (resume later)",
        "render_only": "only rewrite results.json/md and the plots from the cells",
    },
    "Grid",
    "grid",
)


def _reproducing(args: list[str]) -> list[str]:
    """The command line minus what only shapes one session (--max-cells N, --workers N, --order O, --readme F,
    --render-only)."""
    session = ("--max-cells", "--workers", "--order", "--readme")
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in session:
            skip = True
        elif arg != "--render-only" and not arg.startswith(tuple(f"{s}=" for s in session)):
            out.append(arg)
    return out


def _warn_slow_dtypes(spec) -> None:
    """Say before hours of work if a dtype the cells compute in is one this CPU has no fast kernels for."""
    from ifedicl.kernel.modeling import slow_dtype_reason

    dtypes = {spec.base.get(key) for key in ("dtype", "inference_dtype")}
    dtypes |= {overrides.get("dtype") for overrides in spec.variants.values()}
    for dtype in sorted(d for d in dtypes if d):
        if reason := slow_dtype_reason(dtype):
            typer.echo(f"warning: {dtype}: {reason}", err=True)


def _run(spec, out: Path, grid: GridSizes) -> dict:
    from ifedicl.evaluation.grid import run_grid, write_report

    try:
        spec.groups(out)  # validates every group's settings before any work
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if grid.workers < 1:
        raise typer.BadParameter(f"--workers must be >= 1 (got {grid.workers})")
    if not grid.render_only:
        _warn_slow_dtypes(spec)
    command = shlex.join(["ifedicl", *_reproducing(sys.argv[1:])])
    if grid.render_only:
        results = write_report(spec, out, command)
    else:
        results = run_grid(spec, out, command, max_cells=grid.max_cells, workers=grid.workers, order=grid.order)
    typer.echo(f"{results['finished']}/{results['total']} cells finished; wrote {out / 'results.md'}")
    return results


def _headline_text(readme: Path) -> str:
    """The Markdown file's text; it must hold the headline block (checked before any cell is computed, and read
    again after the cells, so edits made meanwhile are kept)."""
    from ifedicl.evaluation.render import headline_span

    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as err:
        raise typer.BadParameter(f"--readme: cannot read {readme}: {err.strerror or err}") from None
    try:
        headline_span(text)
    except ValueError as err:
        raise typer.BadParameter(f"--readme: {readme} {err}") from None
    return text


@grid_options
def report_command(
    grid: GridSizes,
    out: Path = typer.Option(Path("docs/report"), help="report folder: cells/, results.json, results.md, PNGs"),
    tasks: str = typer.Option(REPORT_TASKS, help="comma-separated task directory names under --data-dir"),
    models: str = typer.Option(REPORT_MODELS, help="comma-separated named models / HF ids / paths"),
    seeds: int = typer.Option(3, help="seeds 0..N-1"),
    objectives: str = typer.Option("label-only", help="training losses reported for trainable methods"),
    methods: str = typer.Option(
        "zero_shot,few_shot_icl,local_icl,i2cl_central,local_calibration,fedavg_lora,ifedicl",
        help="methods (fewer than --out's report: only theirs are computed, the report keeps every column)",
    ),
    readme: Path | None = typer.Option(
        None, help="also rewrite this Markdown file's headline block: the accuracy table over the whole grid"
    ),
) -> None:
    """Run (or resume) the report; finished cells are never recomputed. Gemma-3-270M is reported on the
    paper's tasks (Subj, Emotion, AG News) only."""
    from ifedicl.evaluation.cells import write_atomic
    from ifedicl.evaluation.render import with_headline
    from ifedicl.evaluation.variants import REPORT_BASE, REPORT_MODEL_TASKS

    if readme is not None:
        _headline_text(readme)
    spec = grid.spec(models, tasks, seeds, objectives, methods, model_tasks=REPORT_MODEL_TASKS)
    spec.base.update(REPORT_BASE)
    results = _run(spec, out, grid)
    if readme is not None:
        write_atomic(readme, with_headline(_headline_text(readme), results))
        typer.echo(f"rewrote the headline table in {readme}")


@grid_options
def ablate_command(
    grid: GridSizes,
    out: Path = typer.Option(Path("docs/ablation"), help="ablation folder: cells per variant, results.md"),
    tasks: str = typer.Option("subj", help="comma-separated task directory names under --data-dir"),
    models: str = typer.Option("smollm2-135m", help="comma-separated named models / HF ids / paths"),
    seeds: int = typer.Option(2, help="seeds 0..N-1"),
    objectives: str = typer.Option("label-only,full-vocab", help="training losses"),
    variants: str = typer.Option("", help="comma-separated variant names (default: all; see results.md)"),
    methods: str = typer.Option("ifedicl", help="methods run under every variant (e.g. ifedicl,local_calibration)"),
) -> None:
    """IFed-ICL's recipe ablation at a fixed client budget: one resumable cell per (model, task, seed, variant)."""
    from ifedicl.evaluation.variants import ABLATION_BASE, ABLATION_DEFAULTS, ABLATION_VARIANTS

    chosen = _csv(variants.replace(";", ",")) or list(ABLATION_VARIANTS)
    unknown = [v for v in chosen if v not in ABLATION_VARIANTS]
    if unknown:
        raise typer.BadParameter(f"unknown variant(s) {unknown}; choose from {list(ABLATION_VARIANTS)}")
    # every objective runs the variants' methods (the report's "prompt-only methods once" does not apply here)
    variant_settings = {v: ABLATION_VARIANTS[v] for v in chosen}
    spec = grid.spec(models, tasks, seeds, objectives, methods, defaults=ABLATION_DEFAULTS, variants=variant_settings)
    spec.base.update(ABLATION_BASE)
    _run(spec, out, grid)
