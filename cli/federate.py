"""``ifedicl federate``: stage 1 and R rounds of stage 2 on Ray, written to the store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from ifedicl.cli.console import setup_logging
from ifedicl.cli.option_sets import data_options, federation_options, model_spec, revision_option
from ifedicl.cli.run_config import config_option, federation_clients
from ifedicl.kernel.errors import IfediclError


@federation_options
@data_options
def federate_command(
    federation,
    data,
    model: str = typer.Option(..., envvar="IFEDICL_MODEL", help="HF model id or local path"),
    revision: str | None = revision_option(),
    store: str = typer.Option(..., envvar="IFEDICL_STORE", help="LanceDB URI or local directory"),
    task_dir: Path | None = typer.Option(None, help="task.json + train/test .jsonl, .csv or .parquet"),
    dataset: str | None = typer.Option(None, help="HF dataset name or save_to_disk path"),
    template: str | None = typer.Option(None, help="prompt template with {text} (overrides task.json)"),
    labels: str | None = typer.Option(None, help="comma-separated label words in class order"),
    alpha: float = typer.Option(0.5, help="Dirichlet label-skew concentration"),
    seed: int = 0,
    max_train: int | None = typer.Option(None, help="use only the first N training examples"),
    max_test: int = typer.Option(200, help="test examples scored after the run (0: skip)"),
    batch_size: int = typer.Option(8, help="extraction batch size (length-sorted buckets)"),
    publish: bool = typer.Option(False, help="publish the run when it completes"),
    verbose: bool = typer.Option(True, help="structured log line per round"),
    config: Path | None = config_option(),
) -> None:
    """Run stage 1 and R rounds of stage 2 on Ray; write the run to the store."""
    from ifedicl.federation_job.driver import Federation

    setup_logging(verbose)
    model = model_spec(model, revision)
    settings = federation.settings(alpha, seed, capture_batch_size=batch_size)
    clients = federation_clients(
        config, task_dir=task_dir, dataset=dataset, template=template, labels=labels, max_train=max_train,
        max_test=max_test or None, **dataclasses.asdict(data),
    )  # fmt: skip
    result = Federation(model, clients, store, settings).run(publish=publish)
    _print_summary(result.run_id, result.published, result.summary)
    if result.summary.get("publish_refused"):
        raise IfediclError(f"run {result.run_id} is complete but not published: {result.summary['publish_refused']}")


def _print_summary(run_id: str, published: bool, summary: dict) -> None:
    typer.echo(f"run {run_id} complete{' and published' if published else ''}")
    typer.echo(f"  clients: {summary['clients']}, shard sizes {summary['shard_sizes']}")
    typer.echo(
        f"  stage 1 bytes per client: up {summary['stage1_bytes_up_per_client']}, "
        f"down {summary['stage1_bytes_down_per_client']}"
    )
    typer.echo(
        f"  per-round bytes per client: up {summary['round_bytes_up_per_client']}, "
        f"down {summary['round_bytes_down_per_client']}"
    )
    typer.echo(f"  total bytes: up {summary['total_bytes_up']}, down {summary['total_bytes_down']}")
    if "accuracy" in summary:
        typer.echo(
            f"  test accuracy ({summary['test_examples']} examples): zero-shot {summary['zero_shot_accuracy']:.3f}, "
            f"IFed-ICL {summary['accuracy']:.3f}"
        )
    agg = summary.get("aggregation")
    if agg:
        secure = ", secure aggregation" if agg["secagg"] else ""
        step = f", server lr {agg['server_lr']:g}" if agg.get("server_lr", 1.0) != 1.0 else ""
        typer.echo(f"  aggregation: {agg['aggregator']}, norm screen x{agg['reject_norm_factor']:g}{secure}{step}")
    for round_index, rejected in summary.get("rejected", {}).items():
        typer.echo(f"  round {round_index} rejected: {rejected}")
    privacy = summary.get("privacy") or {}
    if privacy.get("total_epsilon") is not None:
        parts = [
            f"{name} ε={part['epsilon']:.3f} (z={part['noise_multiplier']:.3f}, clip {part['clip']:g})"
            for name, part in (("vectors", privacy["vectors"]), ("Λ", privacy["coefficients"]))
            if part["epsilon"] is not None
        ]
        typer.echo(
            f"  differential privacy: total ε={privacy['total_epsilon']:.3f} at δ={privacy['delta']:g}; "
            f"{', '.join(parts)}; {privacy['accountant']}"
        )
