"""The server optimizer on Λ (issue 30, candidate 3): the step math, its schedule, its stored state, and a
recalibration that continues a live run's optimizer (real Ray, real LanceDB, a tiny model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from client_updates import SHAPE, two_clients_around

from ifedicl.federation_job.federation_settings import FederationSettings, build_strategies
from ifedicl.federation_job.options import FederationOptions
from ifedicl.federation_job.server_optimizer import (
    ServerOptimizer,
    ServerOptimizerSettings,
    ServerOptimizerState,
)
from ifedicl.federation_job.strategies import ClientUpdate, FedAvg, RoundId
from ifedicl.kernel.errors import FederationError, IfediclError
from ifedicl.kernel.sources import DataSource
from ifedicl.storage.store import Store


def _round(index: int) -> RoundId:
    return RoundId("calibrate", index, f"round {index}")


def _optimizer(**fields) -> ServerOptimizer:
    return ServerOptimizer(FedAvg(), ServerOptimizerSettings(**fields))


def test_sgd_moves_from_the_round_start_by_lr_times_the_aggregates_change():
    """Λ ← Λ + lr·(mean − Λ): lr 1 is FedAvg's mean, 2 goes twice as far, ½ half; the round's record is the rule's."""
    start = np.full(SHAPE, 2.0, np.float32)
    for lr, expected in ((1.0, 2.5), (2.0, 3.0), (0.5, 2.25)):
        result = _optimizer(kind="sgd", lr=lr).aggregate(_round(1), two_clients_around(2.5), reference=start)
        assert np.allclose(result.value, expected) and result.value.dtype == np.float32, lr
        assert [u.client_id for u in result.used] == [0, 1]
    with pytest.raises(FederationError, match="starting value"):
        _optimizer(lr=2.0).aggregate(_round(1), two_clients_around(2.5))


def test_momentum_adds_up_consistent_rounds():
    """m ← μ·m + Δ: the same change twice moves lr·Δ, then lr·(1 + μ)·Δ."""
    step = _optimizer(kind="momentum", lr=1.0, momentum=0.5)
    first = step.aggregate(_round(1), two_clients_around(1.0), reference=np.zeros(SHAPE, np.float32)).value
    assert np.allclose(first, 1.0)
    second = step.aggregate(_round(2), two_clients_around(2.0), reference=first).value  # Δ = 1 again
    assert np.allclose(second, 1.0 + 1.5)
    assert step.state.steps == 2 and np.allclose(step.state.first_moment, 1.5)


def test_adam_moves_every_coefficient_about_lr_whatever_its_scale():
    """FedAdam, bias-corrected: the first step is lr·Δ/(|Δ| + τ), so a change of 1e-2 and one of 1 move alike."""
    step = _optimizer(kind="adam", lr=0.1, tau=1e-6)
    reference = np.zeros(SHAPE, np.float32)
    updates = [ClientUpdate(0, np.array([1e-2, 1.0, -1e-2, -1.0] * 2, np.float32).reshape(SHAPE), 1)]
    value = step.aggregate(_round(1), updates, reference=reference).value
    np.testing.assert_allclose(value.reshape(-1), [0.1, 0.1, -0.1, -0.1] * 2, rtol=1e-3)
    assert step.state.second_moment is not None and np.all(step.state.second_moment > 0)


def test_the_server_lr_warms_up_then_decays_on_a_cosine():
    settings = ServerOptimizerSettings(lr=1.0, warmup_rounds=3, decay="cosine", rounds_total=8, min_lr_fraction=0.1)
    lrs = [settings.lr_at(r) for r in range(1, 9)]
    assert lrs[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert lrs[3] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert ServerOptimizerSettings(lr=2.0).lr_at(7) == 2.0


def test_plain_fedavg_builds_no_optimizer_and_each_setting_builds_its_own():
    local = FederationOptions(stage2="local-steps")  # a server optimizer steps on local steps' aggregate
    plain = build_strategies(local.settings(0.5, 0), transport=None, num_classes=2)
    assert not isinstance(plain.coefficients, ServerOptimizer)
    adam_options = dataclasses.replace(local, server_optimizer="adam", server_lr=0.05)
    adam = build_strategies(adam_options.settings(0.5, 0), None, 2)
    assert isinstance(adam.coefficients, ServerOptimizer) and adam.coefficients.settings.kind == "adam"
    assert adam.coefficients.settings.lr == 0.05
    assert not isinstance(adam.vectors, ServerOptimizer)  # stage 1 is one mean, not a step


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"server_lr": 0.0}, "--server-lr must be > 0"),
        ({"server_optimizer": "rmsprop"}, "--server-optimizer must be one of"),
        ({"server_momentum": 1.0}, "--server-momentum must be in"),
        ({"server_warmup": -1}, "--server-warmup must be >= 0"),
        ({"server_decay": "linear"}, "--server-decay must be one of"),
    ],
)
def test_bad_server_optimizer_settings_name_their_flag(fields, message):
    with pytest.raises(IfediclError, match=message):
        FederationSettings(stage2="local-steps", **fields).validate()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"steps": np.array([2.0]), "first_moment": np.zeros((3, 2, 2))}, "shape"),
        ({"steps": np.array([2.0]), "first_moment": np.full(SHAPE, np.nan)}, "not finite"),
        ({"steps": np.array([2.0]), "second_moment": -np.ones(SHAPE)}, "negative second moment"),
        ({"steps": np.array([1.5])}, "step count"),
        ({"steps": np.array([1.0]), "velocity": np.zeros(SHAPE)}, "fields"),
        ({"first_moment": np.zeros(SHAPE)}, "fields"),
    ],
)
def test_a_state_that_does_not_fit_is_refused(arrays, message):
    with pytest.raises(FederationError, match=message):
        ServerOptimizerState.from_arrays(arrays, SHAPE)


def test_the_state_round_trips_through_the_store(tmp_path):
    state = ServerOptimizerState(3, np.arange(8, dtype=np.float64).reshape(SHAPE), np.ones(SHAPE))
    store = Store(tmp_path / "store", create=True)
    assert store.server_state("run-a") is None
    store.write_server_state("run-a", 1, ServerOptimizerState(1, np.zeros(SHAPE)).to_arrays())
    store.write_server_state("run-a", 2, state.to_arrays())
    round_index, arrays = store.server_state("run-a")
    back = ServerOptimizerState.from_arrays(arrays, SHAPE)
    assert round_index == 2 and back.steps == 3
    np.testing.assert_array_equal(back.first_moment, state.first_moment)
    np.testing.assert_array_equal(back.second_moment, state.second_moment)


def test_a_warm_started_run_continues_the_live_runs_optimizer(ray_session, llama_dir, task_dir, tmp_path):
    """A run with FedAdam stores its state every round; a run warm-started from it with that state takes up
    the step count and moments (its first step is not the zero-moment one); a state of the wrong shape is not
    used: the optimizer starts afresh, the summary says why, and the run completes."""
    from ifedicl.federation_job.driver import Federation

    source = DataSource(str(task_dir), max_train=32, max_test=12)
    settings = FederationSettings(
        clients=2, alpha=1.0, rounds=2, min_clients=1, round_timeout_s=120, min_shard=4,
        server_optimizer="adam", server_lr=0.02, actors=1, stage2="local-steps",
    )  # fmt: skip
    store_dir = tmp_path / "store"
    live = Federation(str(llama_dir), source, str(store_dir), settings).run()
    store = Store(store_dir)
    round_index, arrays = store.server_state(live.run_id)
    assert round_index == 2 and arrays["steps"][0] == 2

    def continued(state):
        fed = Federation(str(llama_dir), source, str(store_dir), dataclasses.replace(settings, rounds=1))
        fed.start_from(live.coefficients, state)
        return fed.run()

    resumed = continued(arrays)
    assert resumed.summary["server_optimizer_resume"] == {"resumed": True}
    assert store.server_state(resumed.run_id)[1]["steps"][0] == 3

    wrong = {**arrays, "first_moment": np.zeros((1, 2, 2))}
    fresh = continued(wrong)
    assert fresh.summary["server_optimizer_resume"]["resumed"] is False
    assert "shape" in fresh.summary["server_optimizer_resume"]["reason"]
    assert store.server_state(fresh.run_id)[1]["steps"][0] == 1
