"""``ifedicl eval``: every baseline and IFed-ICL on the same split and test set, in one command.

Kept import-light: the model stack, Ray, peft and matplotlib load only when the
command runs. Takes the federation flags of ``ifedicl federate`` (:mod:`ifedicl.cli.option_sets`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from ifedicl.cli.option_sets import data_options, federation_options, model_spec, revision_option
from ifedicl.cli.run_config import ConfigError, RunConfig, config_option
from ifedicl.evaluation.settings import ClientTest, ScoredRounds
from ifedicl.federation_job.options import Dtype

# Federation options EvalSettings holds as its own fields (hashed since before the shared option set).
EVAL_FIELDS = ("clients", "rounds", "local_epochs", "min_shard", "weighted", "objective")
METHOD_NAMES = "zero_shot,few_shot_icl,local_icl,i2cl_central,local_calibration,fedavg_lora,ifedicl"


@federation_options
@data_options
def eval_command(
    federation,
    data,
    tasks: list[str] = typer.Argument(..., help="task directories (task.json + train/test) or HF dataset names/paths"),
    model: str = typer.Option(..., envvar="IFEDICL_MODEL", help="HF model id or local path"),
    revision: str | None = revision_option(),
    out: Path = typer.Option(..., help="output directory (results.json, results.md, PNGs, resumable cells)"),
    alpha: list[float] = typer.Option([0.5], help="Dirichlet label-skew α; repeat for an accuracy-vs-α sweep"),
    seeds: int = typer.Option(1, help="number of seeds (0..N-1): split, demos, training; mean ± std over them"),
    test_size: int = typer.Option(500, help="test examples, sampled uniformly across classes"),
    shots: int = typer.Option(4, help="k demonstrations in the prompt for few-shot and local ICL"),
    max_train: int = typer.Option(5000, help="training examples used (the paper: 5,000); 0 = all"),
    methods: str = typer.Option(METHOD_NAMES, help="comma-separated subset of the methods"),
    lora_rank: int = typer.Option(8, help="FedAvg-LoRA rank"),
    lora_lr: float = typer.Option(5e-4, help="FedAvg-LoRA learning rate"),
    batch_size: int = typer.Option(16, help="inference batch size"),
    dtype: Dtype = typer.Option("float32", help="model dtype"),
    scored_rounds: ScoredRounds = typer.Option(
        "every", help="rounds a federated method is scored after: every one, or doubling (0, 1, 2, 4, 8, ..., the last)"
    ),
    client_test: ClientTest = typer.Option(
        "full", help="local ICL and local-only: each client on the whole test set, or on its own slice (split)"
    ),
    config: Path | None = config_option(),
) -> None:
    """Run (or resume) the evaluation: the paper's tables and plots for your model and data."""
    from ifedicl.evaluation.runner import evaluate
    from ifedicl.evaluation.settings import DATA_DEFAULTS, EvalSettings
    from ifedicl.kernel.data import split_name

    if config and RunConfig.read(config).clients is not None:
        raise ConfigError(
            f"--config {config}: eval compares every method on one data set split over simulated clients; "
            "[[clients]] is for federate and recalibrate"
        )

    for name, flag in ((data.split, "--split"), (data.test_split, "--test-split")):
        if name is not None:
            split_name(name, flag)  # before any cell: a one-line error naming the flag
    settings = EvalSettings(
        model=model_spec(model, revision),
        tasks=list(tasks),
        clients=federation.clients,
        alphas=list(alpha),
        rounds=federation.rounds,
        seeds=list(range(seeds)),
        test_size=test_size,
        shots=shots,
        max_train=max_train or None,
        local_epochs=federation.local_epochs,
        min_shard=federation.min_shard,
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        lora_rank=lora_rank,
        lora_alpha=2 * lora_rank,
        lora_lr=lora_lr,
        weighted=federation.weighted,
        objective=federation.objective,
        federation=federation.changed(exclude=EVAL_FIELDS),
        batch_size=batch_size,
        dtype=dtype,
        scored_rounds=scored_rounds,
        client_test=client_test,
        data={k: v for k, v in dataclasses.asdict(data).items() if v != DATA_DEFAULTS[k]},
    )
    try:
        settings.validate()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    results = evaluate(settings, out)
    run = results["run"]
    typer.echo(f"{run['computed']} cell(s) computed, {run['resumed']} resumed from {out / 'cells'}")
    typer.echo(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(results['plots'])} plot(s)")
    typer.echo((out / "results.md").read_text())

