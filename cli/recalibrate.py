"""``ifedicl recalibrate`` and ``ifedicl recalibration-exporter``.

The federation flags are the ones ``ifedicl federate`` takes (:mod:`ifedicl.cli.option_sets`),
so a recalibration keeps DP, secure aggregation and robust aggregation as the run was given them.

Exit codes of ``recalibrate``: 0 published, 1 kept the live run (candidate worse
than live by more than the margin), 2 failed (reason printed and recorded),
3 another recalibration of the task holds the lock. With ``--kept-live-ok`` a kept live
run exits 0: for schedulers (a RayJob, a CronJob) that count any non-zero exit as a
failure, while the decision stays in the output and the store.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import typer

from ifedicl.cli.option_sets import data_options, federation_options, model_spec, revision_option
from ifedicl.cli.run_config import config_option, federation_clients
from ifedicl.federation_job.options import Dtype

Mode = Literal["full", "stage2"]  # federation_job.recalibrate.MODES, without importing torch for --help


@federation_options
@data_options
def recalibrate_command(
    federation,
    data,
    model: str = typer.Option(
        ..., envvar="IFEDICL_MODEL", help="HF model id or local path (the one the live run was made with)"
    ),
    revision: str | None = revision_option(),
    store: str = typer.Option(..., envvar="IFEDICL_STORE", help="LanceDB URI or local directory"),
    task_dir: Path | None = typer.Option(None, help="task.json + train/test .jsonl, .csv or .parquet"),
    dataset: str | None = typer.Option(None, help="HF dataset name or save_to_disk path"),
    mode: Mode = typer.Option("full", help="full: stage 1 + stage 2; stage2: recalibrate Λ on the published vectors"),
    margin: float = typer.Option(
        0.0, help="publish if candidate accuracy >= live accuracy - margin (negative: demand a gain)"
    ),
    lock_timeout: float = typer.Option(0.0, help="seconds to wait for a concurrent recalibration of the task"),
    lock_file: Path | None = typer.Option(None, help="lock file (default: beside a local store)"),
    alpha: float = typer.Option(0.5, help="Dirichlet label-skew concentration"),
    seed: int = 0,
    max_train: int | None = typer.Option(None, help="use only the first N training examples"),
    max_test: int = typer.Option(200, help="held-out examples both runs are scored on"),
    serving_dtype: Dtype | None = typer.Option(
        None, help="dtype `ifedicl serve` computes in, if not the run's: both runs are compared in it"
    ),
    warm_start: bool = typer.Option(
        True, "--warm-start/--cold-start", help="stage 2 starts from the live run's Λ (default) or the initial Λ"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the attempt record as JSON"),
    kept_live_ok: bool = typer.Option(
        False, help="exit 0, not 1, when the live run is kept (a guardrail decision, recorded either way)"
    ),
    allow_weaker_protections: bool = typer.Option(
        False, help="run even if DP, secure aggregation, the norm screen, the aggregator or --min-clients are "
        "weaker than the live run's (recorded with the attempt)",
    ),
    config: Path | None = config_option(),
) -> None:
    """Re-run the federation for a task; publish only if not worse than the live run by more than --margin."""
    import json
    import logging
    import sys

    from ifedicl.federation_job.recalibrate import recalibrate

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("ifedicl").setLevel(logging.INFO)
    model = model_spec(model, revision)
    source = federation_clients(
        config, task_dir=task_dir, dataset=dataset, max_train=max_train, max_test=max_test or None,
        **dataclasses.asdict(data),
    )  # fmt: skip
    settings = federation.settings(alpha, seed)
    outcome = recalibrate(
        model,
        source,
        store,
        settings,
        mode,
        margin,
        lock_timeout,
        lock_file,
        serving_dtype=serving_dtype,
        warm_start=warm_start,
        allow_weaker_protections=allow_weaker_protections,
    )
    a = outcome.attempt
    if as_json:
        row = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in vars(a).items()}
        typer.echo(json.dumps(row, default=str))
    else:
        typer.echo(f"recalibration of {a.task} ({a.mode}): {a.decision}")
        typer.echo(f"  {a.reason}")
    exit_code = 0 if kept_live_ok and outcome.attempt.decision == "kept_live" else outcome.exit_code
    if exit_code:
        if not as_json:
            typer.echo(f"error: recalibration {a.decision}: {a.reason}", err=True)
        raise SystemExit(exit_code)


def recalibration_exporter_command(
    store: str = typer.Option(..., envvar="IFEDICL_STORE", help="LanceDB URI or local directory"),
    port: int = typer.Option(9464, help="port for /metrics"),
    host: str = typer.Option("0.0.0.0", help="address to bind"),
) -> None:
    """Serve ifedicl_recalibration_* and ifedicl_store_* metrics read from the store."""
    import time

    from prometheus_client import REGISTRY, start_http_server

    from ifedicl.storage.store_metrics import RecalibrationCollector

    REGISTRY.register(RecalibrationCollector(store))
    start_http_server(port, addr=host)
    typer.echo(f"serving recalibration metrics for {store} on http://{host}:{port}/metrics")
    while True:
        time.sleep(3600)
