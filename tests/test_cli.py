"""The CLI's one federation option set: federate, recalibrate and eval cannot drift apart."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from ifedicl.cli.main import app
from ifedicl.federation_job.options import FederationOptions

FEDERATION_FLAGS = {f.name for f in dataclasses.fields(FederationOptions)}


def _params(command: str) -> set[str]:
    click_app = typer.main.get_command(app)
    return {p.name for p in click_app.commands[command].params}


@pytest.mark.parametrize("command", ["federate", "recalibrate", "eval"])
def test_every_federation_command_takes_every_federation_flag(command):
    assert _params(command) >= FEDERATION_FLAGS, sorted(FEDERATION_FLAGS - _params(command))


def test_recalibrate_keeps_dp_secure_and_robust_aggregation():
    """The flags reach the settings the recalibration runs with (they were silently absent)."""
    options = FederationOptions(
        clients=4, min_clients=3, secagg=True, dp_vector_epsilon=2.0, dp_coefficient_epsilon=4.0, dp_delta=1e-6,
        stage2="local-steps",  # DP on Λ and robust aggregators are local steps' (the second-order round refuses them)
    )
    settings = options.settings(alpha=0.3, seed=7)
    assert settings.secagg and settings.min_clients == 3 and (settings.alpha, settings.seed) == (0.3, 7)
    assert (settings.privacy.vector_epsilon, settings.privacy.coefficient_epsilon) == (2.0, 4.0)
    assert settings.privacy.delta == 1e-6
    robust_options = FederationOptions(aggregator="trimmed-mean", trim_fraction=0.2, reject_norm_factor=3.0)
    robust = dataclasses.replace(robust_options, stage2="local-steps").settings(0.5, 0)
    assert (robust.aggregator, robust.trim_fraction, robust.reject_norm_factor) == ("trimmed-mean", 0.2, 3.0)
    settings.validate()
    robust.validate()


def test_every_option_reaches_the_federation_settings():
    """Changing any one option changes the settings: none is declared and then dropped."""
    base = FederationOptions().settings(0.5, 0).to_dict()
    changed = {
        "clients": 3, "actors": 2, "rounds": 2, "local_epochs": 2, "fraction": 0.5, "min_clients": 2,
        "round_timeout": 5.0,
        "min_shard": 3, "weighted": True, "weights": "per-actor", "cpus_per_client": 1.0, "gpus_per_client": 0.5,
        "calib_batch_size": 4, "objective": "full-vocab", "prior_correction": True, "extract_dtype": "bfloat16",
        "stage1": "class-balanced", "vector_coding": "float16", "aggregator": "median",
        "trim_fraction": 0.2, "reject_norm_factor": 0.0, "server_lr": 2.0, "secagg": True, "dp_vector_epsilon": 1.0,
        "dp_vector_clip": 2.0, "dp_coefficient_epsilon": 1.0, "dp_coefficient_clip": 0.2, "dp_delta": 1e-6,
        "server_optimizer": "adam", "server_momentum": 0.5, "server_warmup": 2, "server_decay": "cosine",
        "stage2": "local-steps", "curvature": "sampled", "curvature_memory": 0.5, "curvature_fraction": 0.5,
        "step_check": "model",
        "step_check_fraction": 0.5, "step_check_confidence": 2.0,
        "holdout_fraction": 0.2, "patience": 3, "secagg_threshold": 0.75, "stage1_examples": 8, "trust_radius": 2.0,
        "average_rounds": 3, "step_ridge": 0.1,
        "remember_undone": False,
    }  # fmt: skip
    assert set(changed) == FEDERATION_FLAGS
    for name, value in changed.items():
        assert FederationOptions(**{name: value}).settings(0.5, 0).to_dict() != base, name
    assert FederationOptions(**changed).changed() == changed
