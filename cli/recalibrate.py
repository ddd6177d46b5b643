"""``ifedicl recalibrate`` and ``ifedicl recalibration-exporter``.

Plain typer-annotated functions, registered on the main app in ``cli.py``; also
runnable alone (``python -m federation_job.recalibrate_cli recalibrate ...``).

Exit codes of ``recalibrate``: 0 published, 1 kept the live run (candidate worse
than live by more than the margin), 2 failed (reason printed and recorded),
3 another recalibration of the task holds the lock. With ``--kept-live-ok`` a kept live
run exits 0: for schedulers (a RayJob, a CronJob) that count any non-zero exit as a
failure, while the decision stays in the output and the store.
"""

from __future__ import annotations

from pathlib import Path

import typer


def recalibrate_command(
    model: str = typer.Option(..., help="HF model id or local path (the one the live run was made with)"),
    store: str = typer.Option(..., help="LanceDB URI or local directory"),
    task_dir: Path | None = typer.Option(None, help="task.json + train/test .jsonl or .csv"),
    dataset: str | None = typer.Option(None, help="HF dataset name or save_to_disk path"),
    mode: str = typer.Option("full", help="full: stage 1 + stage 2; stage2: recalibrate Λ on the published vectors"),
    margin: float = typer.Option(
        0.0, help="publish if candidate accuracy >= live accuracy - margin (negative: demand a gain)"
    ),
    lock_timeout: float = typer.Option(0.0, help="seconds to wait for a concurrent recalibration of the task"),
    lock_file: Path | None = typer.Option(None, help="lock file (default: beside a local store)"),
    clients: int = 10,
    alpha: float = typer.Option(0.5, help="Dirichlet label-skew concentration"),
    rounds: int = 5,
    local_epochs: int = 1,
    fraction: float = typer.Option(1.0, help="fraction of clients sampled per round"),
    min_clients: int = 1,
    round_timeout: float = typer.Option(1800.0, help="seconds a round waits for clients"),
    seed: int = 0,
    max_train: int | None = typer.Option(None, help="use only the first N training examples"),
    max_test: int = typer.Option(200, help="held-out examples both runs are scored on"),
    serving_dtype: str | None = typer.Option(
        None, help="dtype `ifedicl serve` computes in, if not the run's: both runs are compared in it"
    ),
    min_shard: int = 2,
    weights: str = typer.Option("shared", help="shared (one copy per node) or per-actor model weights"),
    cpus_per_client: float | None = None,
    gpus_per_client: float = 0.0,
    as_json: bool = typer.Option(False, "--json", help="print the attempt record as JSON"),
    kept_live_ok: bool = typer.Option(
        False, help="exit 0, not 1, when the live run is kept (a guardrail decision, recorded either way)"
    ),
) -> None:
    """Re-run the federation for a task; publish only if not worse than the live run by more than --margin."""
    import json
    import logging
    import sys

    from ifedicl.federation_job.driver import FederationSettings
    from ifedicl.federation_job.recalibrate import recalibrate
    from ifedicl.kernel.sources import DataSource

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("ifedicl").setLevel(logging.INFO)
    source = DataSource.from_options(task_dir, dataset, max_train=max_train, max_test=max_test or None)
    settings = FederationSettings(
        clients=clients,
        alpha=alpha,
        rounds=rounds,
        local_epochs=local_epochs,
        fraction=fraction,
        min_clients=min_clients,
        round_timeout_s=round_timeout,
        seed=seed,
        min_shard=min_shard,
        weights=weights,
        cpus_per_client=cpus_per_client,
        gpus_per_client=gpus_per_client,
    )
    outcome = recalibrate(
        model, source, store, settings, mode, margin, lock_timeout, lock_file, serving_dtype=serving_dtype
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
    store: str = typer.Option(..., help="LanceDB URI or local directory"),
    port: int = typer.Option(9464, help="port for /metrics"),
    host: str = typer.Option("0.0.0.0", help="address to bind"),
) -> None:
    """Serve ifedicl_recalibration_* and ifedicl_store_* metrics read from the store."""
    import time

    from prometheus_client import REGISTRY, start_http_server

    from ifedicl.federation_job.recalibrate import RecalibrationCollector

    REGISTRY.register(RecalibrationCollector(store))
    start_http_server(port, addr=host)
    typer.echo(f"serving recalibration metrics for {store} on http://{host}:{port}/metrics")
    while True:
        time.sleep(3600)


app = typer.Typer(add_completion=False, no_args_is_help=True)
app.command("recalibrate")(recalibrate_command)
app.command("recalibration-exporter")(recalibration_exporter_command)


def main() -> None:
    """Standalone entry: usage errors exit 2, as under ``ifedicl``."""
    from ifedicl.kernel.errors import IfediclError

    try:
        app(standalone_mode=False)
    except IfediclError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
