"""``ifedicl report``: the issue-11 report, ``ifedicl eval`` over models × tasks × seeds × objectives.

Thin: the grid (:mod:`ifedicl.evaluation.grid`) runs the eval harness's own cells,
resumable one JSON per cell under ``--out``. Its defaults are the report's grid; ``make
report`` runs it. Registered by the main CLI as ``ifedicl report``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

REPORT_TASKS = "subj,emotion,agnews,sst2,trec"
REPORT_MODELS = "smollm2-135m,gemma3-270m"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _sizes(clients, alpha, rounds, local_epochs, test_size, max_train, shots, batch_size, threads, inference_dtype):
    return dict(
        threads=threads or None,
        inference_dtype=inference_dtype or None,
        clients=clients,
        alphas=[alpha],
        rounds=rounds,
        local_epochs=local_epochs,
        test_size=test_size,
        max_train=max_train or None,
        shots=shots,
        batch_size=batch_size,
    )


def _reproducing(args: list[str]) -> list[str]:
    """The command line minus what only shapes one session (--max-cells N, --render-only)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--max-cells":
            skip = True
        elif arg != "--render-only" and not arg.startswith("--max-cells="):
            out.append(arg)
    return out


def _run(spec, out: Path, render_only: bool, max_cells: int | None) -> None:
    from ifedicl.evaluation.grid import run_grid, write_report

    try:
        spec.groups(out)  # validates every group's settings before any work
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    command = shlex.join(["ifedicl", *_reproducing(sys.argv[1:])])
    run = write_report if render_only else lambda *a: run_grid(*a, max_cells=max_cells)
    results = run(spec, out, command)
    typer.echo(f"{results['finished']}/{results['total']} cells finished; wrote {out / 'results.md'}")


def report_command(
    out: Path = typer.Option(Path("docs/report"), help="report folder: cells/, results.json, results.md, PNGs"),
    data_dir: Path = typer.Option(Path("../shared/data"), help="one task directory per task"),
    tasks: str = typer.Option(REPORT_TASKS, help="comma-separated task directory names under --data-dir"),
    models: str = typer.Option(REPORT_MODELS, help="comma-separated named models / HF ids / paths"),
    seeds: int = typer.Option(3, help="seeds 0..N-1"),
    objectives: str = typer.Option("full-vocab,label-only", help="training losses reported for trainable methods"),
    methods: str = typer.Option(
        "zero_shot,few_shot_icl,local_icl,i2cl_central,local_calibration,fedavg_lora,ifedicl", help="methods"
    ),
    clients: int = typer.Option(10),
    alpha: float = typer.Option(0.5),
    rounds: int = typer.Option(3),
    local_epochs: int = typer.Option(1),
    test_size: int = typer.Option(200),
    max_train: int = typer.Option(600),
    shots: int = typer.Option(4),
    batch_size: int = typer.Option(16),
    threads: int = typer.Option(1, help="torch threads in the driver (0: torch's default); 1 is fastest when shared"),
    inference_dtype: str = typer.Option("", help="dtype of the prompt-only methods (default: float32, as the rest)"),
    max_cells: int | None = typer.Option(None, help="compute at most this many cells, then stop (resume later)"),
    render_only: bool = typer.Option(False, help="only rewrite results.json/md and the plots from the cells"),
) -> None:
    """Run (or resume) the report; finished cells are never recomputed."""
    from ifedicl.evaluation.grid import GridSpec

    spec = GridSpec(
        models=_csv(models),
        tasks=[str(data_dir / t) for t in _csv(tasks)],
        seeds=list(range(seeds)),
        objectives=_csv(objectives),
        methods=_csv(methods),
        base=_sizes(
            clients, alpha, rounds, local_epochs, test_size, max_train, shots, batch_size, threads, inference_dtype
        ),
    )
    _run(spec, out, render_only, max_cells)


def ablate_command(
    out: Path = typer.Option(Path("docs/ablation"), help="ablation folder: cells per variant, results.md"),
    data_dir: Path = typer.Option(Path("../shared/data"), help="one task directory per task"),
    tasks: str = typer.Option("subj", help="comma-separated task directory names under --data-dir"),
    models: str = typer.Option("smollm2-135m", help="comma-separated named models / HF ids / paths"),
    seeds: int = typer.Option(2, help="seeds 0..N-1"),
    objectives: str = typer.Option("label-only,full-vocab", help="training losses"),
    variants: str = typer.Option("", help="comma-separated variant names (default: all; see results.md)"),
    methods: str = typer.Option("ifedicl", help="methods run under every variant (e.g. ifedicl,local_calibration)"),
    clients: int = typer.Option(10),
    alpha: float = typer.Option(0.5),
    rounds: int = typer.Option(3),
    local_epochs: int = typer.Option(1),
    test_size: int = typer.Option(200),
    max_train: int = typer.Option(600),
    shots: int = typer.Option(4),
    batch_size: int = typer.Option(16),
    threads: int = typer.Option(1, help="torch threads in the driver (0: torch's default); 1 is fastest when shared"),
    inference_dtype: str = typer.Option("", help="dtype of the prompt-only methods (default: float32, as the rest)"),
    max_cells: int | None = typer.Option(None, help="compute at most this many cells, then stop (resume later)"),
    render_only: bool = typer.Option(False, help="only rewrite results.json/md from the cells"),
) -> None:
    """IFed-ICL's recipe ablation at a fixed client budget: one resumable cell per (model, task, seed, variant)."""
    from ifedicl.evaluation.grid import ABLATION_VARIANTS, GridSpec

    chosen = _csv(variants.replace(";", ",")) or list(ABLATION_VARIANTS)
    unknown = [v for v in chosen if v not in ABLATION_VARIANTS]
    if unknown:
        raise typer.BadParameter(f"unknown variant(s) {unknown}; choose from {list(ABLATION_VARIANTS)}")
    spec = GridSpec(
        models=_csv(models),
        tasks=[str(data_dir / t) for t in _csv(tasks)],
        seeds=list(range(seeds)),
        objectives=_csv(objectives),
        methods=_csv(methods),
        base=_sizes(
            clients, alpha, rounds, local_epochs, test_size, max_train, shots, batch_size, threads, inference_dtype
        ),
        variants={v: ABLATION_VARIANTS[v] for v in chosen},
    )
    # every objective runs the variants' methods (the report's "prompt-only methods once" does not apply here)
    _run(spec, out, render_only, max_cells)
