"""Tail averaging of Λ (--average-rounds): each round publishes the mean of the last rounds' Λ, the round rule
keeps stepping from its own, and the window is server state a warm start continues."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from client_updates import SHAPE, two_clients_around

from ifedicl.evaluation.settings import EvalSettings
from ifedicl.federation_job.federation_settings import FederationSettings, build_strategies
from ifedicl.federation_job.options import FederationOptions
from ifedicl.federation_job.recalibrate import _live_server_state
from ifedicl.federation_job.second_order import TrustRegionNewton, trust_region_trace
from ifedicl.federation_job.server_optimizer import ServerOptimizer, ServerOptimizerSettings
from ifedicl.federation_job.strategies import FedAvg, RoundId
from ifedicl.federation_job.tail_average import ITERATES, TailAverage, tail_average
from ifedicl.kernel.errors import FederationError, IfediclError
from ifedicl.kernel.modeling import ModelFingerprint
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage.store import Store


def _averaged(rounds: int = 2) -> TailAverage:
    """A tail average over a server step that reads its reference (lr 2: Λ ← Λ + 2·(mean − Λ))."""
    return TailAverage(ServerOptimizer(FedAvg(), ServerOptimizerSettings(lr=2.0)), rounds)


def _round(rule: TailAverage, index: int, published: np.ndarray, mean: float) -> tuple[np.ndarray, np.ndarray]:
    """One round as the driver runs it -> (the Λ the clients computed at, the Λ the round published)."""
    upload = rule.round_upload(published)
    start = published if upload.start is None else upload.start
    result = rule.aggregate(RoundId("calibrate", index, f"round {index}"), two_clients_around(mean), reference=start)
    return start, result.value


def test_each_round_publishes_the_mean_of_the_last_iterates_and_the_rule_steps_from_its_own():
    rule = _averaged(rounds=2)
    start, published = _round(rule, 1, np.zeros(SHAPE, np.float32), mean=1.0)
    assert np.allclose(start, 0.0) and np.allclose(published, 2.0)  # iterate 0 + 2·(1 − 0): the window is one
    start, published = _round(rule, 2, published, mean=3.0)
    assert np.allclose(start, 2.0) and np.allclose(published, 3.0)  # iterate 2 + 2·(3 − 2) = 4, mean of 2 and 4
    start, published = _round(rule, 3, published, mean=5.0)
    assert np.allclose(start, 4.0), "the clients compute at the rule's iterate, not at the published mean"
    assert np.allclose(published, (4.0 + 6.0) / 2) and published.dtype == np.float32  # iterate 4 + 2·(5 − 4)
    assert np.allclose(rule.state_arrays()[ITERATES], np.stack([np.full(SHAPE, 4.0), np.full(SHAPE, 6.0)]))


def test_one_round_publishes_its_own_and_the_average_wraps_any_rule():
    rule = FedAvg()
    assert tail_average(rule, 1) is rule
    assert isinstance(tail_average(rule, 3), TailAverage)
    with pytest.raises(FederationError, match="at least 2"):
        TailAverage(rule, 1)
    settings = FederationSettings(clients=2, average_rounds=3)
    coefficients = build_strategies(settings, transport=None, num_classes=2).coefficients
    assert isinstance(coefficients, TailAverage) and isinstance(coefficients.inner, TrustRegionNewton)
    with pytest.raises(IfediclError, match="--average-rounds must be >= 1"):
        FederationSettings(clients=2, average_rounds=0).validate()


def test_the_window_round_trips_through_the_store_and_a_smaller_window_keeps_the_newest(tmp_path):
    rule = _averaged(rounds=3)
    published = np.zeros(SHAPE, np.float32)
    for index, mean in enumerate((1.0, 2.0, 4.0), start=1):
        published = _round(rule, index, published, mean)[1]
    store = Store(tmp_path / "store", create=True)
    store.write_server_state("run-a", 3, rule.state_arrays())
    resumed = _averaged(rounds=2)
    resumed.resume(store.server_state("run-a")[1], SHAPE)
    np.testing.assert_allclose(np.stack(resumed.iterates), np.stack(rule.iterates[-2:]))
    np.testing.assert_allclose(resumed.round_upload(published).start, rule.iterates[-1])
    fresh = _averaged(rounds=2)
    fresh.resume({}, SHAPE)  # a live run that published its own Λ: the window starts at the next round
    assert fresh.iterates == [] and fresh.round_upload(published).start is published


@pytest.mark.parametrize(
    "iterates, message",
    [
        (np.zeros((2, 1, 2, 2)), "shape"),
        (np.zeros((0, *SHAPE)), "shape"),
        (np.zeros(SHAPE), "shape"),
        (np.full((2, *SHAPE), np.nan), "not finite"),
    ],
)
def test_stored_iterates_that_do_not_fit_are_refused(iterates, message):
    with pytest.raises(FederationError, match=message):
        _averaged().resume({ITERATES: iterates}, SHAPE)


def test_only_ifedicl_cells_that_average_change_their_hash():
    plain = EvalSettings("m", ["t"])
    averaged = EvalSettings("m", ["t"], federation=FederationOptions(average_rounds=2).changed())
    assert averaged.federation_for_hash("ifedicl")["average_rounds"] == 2
    assert plain.cell_hash("ifedicl", 2) != averaged.cell_hash("ifedicl", 2)
    for method in ("fedavg_lora", "i2cl_central", "local_calibration"):
        assert plain.cell_hash(method, 2) == averaged.cell_hash(method, 2), method


def test_a_recalibration_takes_the_window_only_if_it_averages_too(tmp_path):
    """The live run's stored iterates go to a recalibration that averages; one that publishes its own Λ gets the
    rule's state alone (the trust region would refuse a field it does not know), and only if it starts from the
    last iterate: the rule's state describes the step that made that iterate, not the published mean."""
    store = Store(tmp_path / "store", create=True)
    live = FederationSettings(clients=2, average_rounds=2)
    task = TaskSpec("demo-sentiment", "Review: {text}\nSentiment:", ("negative", "positive"))
    run_id = store.start_run(task, ModelFingerprint("m", 2, 8, "h"), live.to_dict())
    iterates = np.stack([np.zeros(SHAPE), np.ones(SHAPE)])  # [2, L, 2, 2]
    state = {"radius": np.asarray([0.5]), "predicted": np.asarray([0.0, 0.0]), ITERATES: iterates}
    store.write_server_state(run_id, 2, state)
    mean, last = iterates.mean(axis=0), iterates[-1]
    assert set(_live_server_state(store, run_id, live, mean)) == {"radius", "predicted", ITERATES}
    own = dataclasses.replace(live, average_rounds=1)
    assert _live_server_state(store, run_id, own, mean) is None  # the published mean: the rule starts afresh
    assert set(_live_server_state(store, run_id, own, last)) == {"radius", "predicted"}  # a stop on the iterate
    store.write_server_state(run_id, 3, {**state, ITERATES: np.ones((2, 3))})  # not a window of this Λ
    assert _live_server_state(store, run_id, own, last) is None


def test_an_averaging_federation_steps_as_the_plain_one_and_a_warm_start_continues_its_window(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Same seed, two rounds of the second-order round: the averaging run's iterates are the plain run's Λ (the
    trajectory is the rule's), it publishes their running mean, and its stored trust region still reads. A run
    warm-started from it with its state computes at the last iterate and publishes the mean with it."""
    from ifedicl.federation_job.driver import Federation

    source = DataSource(str(task_dir), max_train=24, max_test=8)
    settings = FederationOptions(clients=2, rounds=2, local_epochs=0.5, min_shard=4, actors=1).settings(1.0, 0)
    plain = Federation(str(llama_dir), source, str(tmp_path / "plain"), settings).run()
    averaged_settings = dataclasses.replace(settings, average_rounds=2)
    averaged = Federation(str(llama_dir), source, str(tmp_path / "store"), averaged_settings).run()

    plain_by_round = Store(tmp_path / "plain").coefficients_by_round(plain.run_id)
    store = Store(tmp_path / "store")
    by_round = store.coefficients_by_round(averaged.run_id)
    round_index, state = store.server_state(averaged.run_id)
    assert round_index == 2 and state[ITERATES].shape == (2, *plain.coefficients.shape)
    np.testing.assert_allclose(state[ITERATES], np.stack([plain_by_round[1], plain_by_round[2]]), atol=1e-5)
    np.testing.assert_allclose(by_round[1], plain_by_round[1], atol=1e-5)
    np.testing.assert_allclose(by_round[2], (plain_by_round[1] + plain_by_round[2]) / 2, atol=1e-5)
    np.testing.assert_allclose(averaged.coefficients, by_round[2], atol=1e-6)  # the run ends on the mean
    assert not np.allclose(by_round[2], plain_by_round[2], atol=1e-4)
    trace = trust_region_trace(store.server_states(averaged.run_id))
    assert [t["round"] for t in trace] == [1, 2] and trace[1]["previous_ratio"] is not None

    continued = Federation(str(llama_dir), source, str(tmp_path / "store"), dataclasses.replace(averaged_settings,
                           rounds=1))  # fmt: skip
    continued.start_from(averaged.coefficients, state)
    result = continued.run()
    assert result.summary["server_optimizer_resume"] == {"resumed": True}
    window = store.server_state(result.run_id)[1][ITERATES]
    np.testing.assert_allclose(window[0], plain_by_round[2], atol=1e-5)  # the live run's last iterate
    np.testing.assert_allclose(result.coefficients, window.mean(axis=0), atol=1e-6)
