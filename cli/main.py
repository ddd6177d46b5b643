"""The ``ifedicl`` command line.

Errors a user can act on are printed as one line (``error: ...``) with exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from ifedicl.kernel.errors import IfediclError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Implicit Federated In-Context Learning.")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("ifedicl").setLevel(logging.INFO)
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
def federate(
    model: str = typer.Option(..., help="HF model id or local path"),
    store: str = typer.Option(..., help="LanceDB URI or local directory"),
    task_dir: Path | None = typer.Option(None, help="task.json + train/test .jsonl or .csv"),
    dataset: str | None = typer.Option(None, help="HF dataset name or save_to_disk path"),
    template: str | None = typer.Option(None, help="prompt template with {text} (overrides task.json)"),
    labels: str | None = typer.Option(None, help="comma-separated label words in class order"),
    clients: int = 10,
    alpha: float = typer.Option(0.5, help="Dirichlet label-skew concentration"),
    rounds: int = 5,
    local_epochs: int = 1,
    fraction: float = typer.Option(1.0, help="fraction of clients sampled per round"),
    min_clients: int = 1,
    round_timeout: float = typer.Option(1800.0, help="seconds a round waits for clients"),
    seed: int = 0,
    max_train: int | None = typer.Option(None, help="use only the first N training examples"),
    max_test: int = typer.Option(200, help="test examples scored after the run (0: skip)"),
    min_shard: int = 2,
    weighted: bool = typer.Option(False, help="weight vector and Λ means by client example counts"),
    weights: str = typer.Option("shared", help="shared (one copy per node) or per-actor model weights"),
    cpus_per_client: float | None = None,
    gpus_per_client: float = 0.0,
    batch_size: int = typer.Option(8, help="extraction batch size (length-sorted buckets)"),
    calib_batch_size: int = typer.Option(2, help="calibration batch size (I2CL: 2)"),
    objective: str = typer.Option(
        "full-vocab", help="calibration loss: full-vocab (I2CL) or label-only cross-entropy of the label word"
    ),
    extract_dtype: str = typer.Option("float32", help="stage-1 autocast dtype: float32 | bfloat16 | float16"),
    aggregator: str = typer.Option("mean", help="mean | trimmed-mean | median (coordinate-wise, vectors and Λ)"),
    trim_fraction: float = typer.Option(0.1, help="trimmed-mean: fraction cut from each end"),
    reject_norm_factor: float = typer.Option(
        10.0, help="reject updates with norm > FACTOR x the round's median (vectors; Λ deltas); 0: off"
    ),
    secagg: bool = typer.Option(False, help="secure aggregation: the server sees only masked sums"),
    dp_vector_epsilon: float | None = typer.Option(None, help="DP on the uploaded vectors: ε (one release)"),
    dp_vector_clip: float = typer.Option(1.0, help="DP: per-example L2 bound of the [L,2,d] contribution"),
    dp_coefficient_epsilon: float | None = typer.Option(None, help="DP on Λ updates: ε over all rounds"),
    dp_coefficient_clip: float = typer.Option(0.1, help="DP: L2 bound of a client's per-round Λ delta"),
    dp_delta: float = typer.Option(1e-5, help="DP: δ"),
    publish: bool = typer.Option(False, help="publish the run when it completes"),
    verbose: bool = typer.Option(True, help="structured log line per round"),
) -> None:
    """Run stage 1 and R rounds of stage 2 on Ray; write the run to the store."""
    from ifedicl.federation_job.client import CalibrationConfig
    from ifedicl.federation_job.driver import Federation, FederationSettings
    from ifedicl.federation_job.privacy import PrivacySettings

    _setup_logging(verbose)
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
        weighted_vectors=weighted,
        weighted_coefficients=weighted,
        capture_batch_size=batch_size,
        calibration=CalibrationConfig(batch_size=calib_batch_size, objective=objective),
        extract_dtype=extract_dtype,
        weights=weights,
        cpus_per_client=cpus_per_client,
        gpus_per_client=gpus_per_client,
        aggregator=aggregator,
        trim_fraction=trim_fraction,
        reject_norm_factor=reject_norm_factor,
        secagg=secagg,
        privacy=PrivacySettings(
            vector_epsilon=dp_vector_epsilon,
            vector_clip=dp_vector_clip,
            coefficient_epsilon=dp_coefficient_epsilon,
            coefficient_clip=dp_coefficient_clip,
            delta=dp_delta,
        ),
    )
    from ifedicl.kernel.sources import DataSource

    source = DataSource.from_options(task_dir, dataset, template, labels, max_train, max_test or None)
    result = Federation(model, source, store, settings).run(publish=publish)
    _print_summary(result.run_id, result.published, result.summary)


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
        typer.echo(f"  aggregation: {agg['aggregator']}, norm screen x{agg['reject_norm_factor']:g}{secure}")
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


@app.command()
def predict(
    texts: list[str] = typer.Argument(None, help="texts to classify"),
    store: str = typer.Option(...),
    model: str = typer.Option(...),
    task: str = typer.Option(...),
    run: str | None = typer.Option(None, help="a run id instead of the published one"),
    file: Path | None = typer.Option(None, help="one text per line"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per text"),
) -> None:
    """Classify texts on the HF reference path with a stored run."""
    from ifedicl.serving.reference import ReferenceClassifier
    from ifedicl.storage.store import Store

    items = list(texts or [])
    if file is not None:
        if not file.exists():
            raise IfediclError(f"file {file} does not exist")
        items += [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise IfediclError("no text to classify: pass TEXT arguments or --file")
    stored = Store(store)
    classifier = ReferenceClassifier(model)
    stored_run = classifier.load(stored, task, run)
    for p in classifier.classify(stored_run.task, items, stored_run):
        if as_json:
            typer.echo(json.dumps({"text": p.text, "label": p.label, "probabilities": p.probabilities}))
        else:
            probs = ", ".join(f"{w}={v:.3f}" for w, v in p.probabilities.items())
            typer.echo(f"{p.label}\t[{probs}]\t{p.text}")


@app.command()
def runs(
    store: str = typer.Option(...),
    task: str | None = None,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List runs with their status, and which one is published per task."""
    from ifedicl.storage.store import Store

    stored = Store(store)
    published = stored.published()
    rows = stored.runs(task)
    if as_json:
        for row in rows:
            row = {k: (str(v) if k.endswith("_at") else v) for k, v in row.items()}
            typer.echo(json.dumps({**row, "published": published.get(row["task"]) == row["run_id"]}))
        return
    if not rows:
        typer.echo("no runs")
    for row in rows:
        mark = "*" if published.get(row["task"]) == row["run_id"] else " "
        summary = json.loads(row["summary"] or "{}")
        acc = f" acc={summary['accuracy']:.3f}" if "accuracy" in summary else ""
        typer.echo(f"{mark} {row['run_id']}  {row['status']:<8} {row['created_at']:%Y-%m-%d %H:%M:%S}{acc}")


@app.command()
def publish(run_id: str, store: str = typer.Option(...)) -> None:
    """Make a complete run the live one for its task."""
    from ifedicl.storage.store import Store

    task = Store(store).publish(run_id)
    typer.echo(f"published {run_id} for task {task}")


@app.command()
def rollback(task: str, store: str = typer.Option(...)) -> None:
    """Move the task's tag back to the run published before the current one."""
    from ifedicl.storage.store import Store

    run_id = Store(store).rollback(task)
    typer.echo(f"task {task} rolled back to {run_id}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("ifedicl-demo"), help="where the store and the server log are written"),
    model: str = typer.Option("smollm2-135m", help="a named model, a .gguf file or an HF directory"),
    task_dir: Path | None = typer.Option(None, help="task to federate (default: a Subj slice shipped with ifedicl)"),
    clients: int = 4,
    rounds: int = 3,
    alpha: float = typer.Option(0.5, help="Dirichlet label-skew concentration"),
) -> None:
    """End to end on a real model, offline: federate on local Ray, publish, serve, classify via the OpenAI API."""
    from ifedicl.cli.demo import run_demo
    from ifedicl.devkit import DEMO_TASK_DIR

    _setup_logging(True)
    run_demo(workdir, model, task_dir or DEMO_TASK_DIR, clients, rounds, alpha, echo=typer.echo)


@app.command("build-model")
def build_model(
    out: Path = typer.Option(..., help="directory to write the model and tokenizer to"),
    task_dir: list[Path] = typer.Option(..., help="task dirs whose texts train the tokenizer (repeatable)"),
    family: str = typer.Option("llama", help="llama | qwen2 | gpt2"),
    layers: int = 2,
    hidden_size: int = 128,
    vocab_size: int = 2048,
    seed: int = 0,
) -> None:
    """Build a small random model offline (for trying the pipeline without a hub)."""
    from ifedicl.devkit.demo_data import corpus
    from ifedicl.devkit.tiny_model import build_tiny_model
    from ifedicl.kernel.data import load_task_dir

    texts: list[str] = []
    for directory in task_dir:
        data = load_task_dir(directory)
        texts += corpus(data.task, data.train.texts)
    try:
        build_tiny_model(out, texts, family, layers, hidden_size, vocab_size, seed)
    except ValueError as err:
        raise IfediclError(str(err)) from None
    typer.echo(f"wrote a random {family} (L={layers}, d={hidden_size}) to {out}")


def _register_subcommands() -> None:
    """Commands that live beside their own modules, registered here so there is one CLI."""
    from ifedicl.cli.evaluate import eval_command
    from ifedicl.cli.models import models_app
    from ifedicl.cli.recalibrate import recalibrate_command, recalibration_exporter_command
    from ifedicl.cli.report import ablate_command, report_command
    from ifedicl.cli.serve import serve

    app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve)
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    app.command("ablate")(ablate_command)
    app.command("recalibrate")(recalibrate_command)
    app.command("recalibration-exporter")(recalibration_exporter_command)
    app.add_typer(models_app, name="models")


_register_subcommands()


def main() -> None:
    try:
        app(standalone_mode=False)
    except IfediclError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None
    except Exception as err:
        import click

        if isinstance(err, click.exceptions.Abort):
            raise SystemExit(130) from None
        if isinstance(err, click.ClickException):
            err.show()
            raise SystemExit(err.exit_code) from None
        raise


if __name__ == "__main__":
    main()
