"""Robust aggregation: screening rules and robust means, and one adversary in a real Ray federation."""

import json

import numpy as np
import pytest

from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.federation_job.federation_settings import build_strategies
from ifedicl.federation_job.robust import (
    CoordinateMedian,
    NormScreen,
    Screened,
    TrimmedMean,
    coordinate_trimmed_mean,
    trim_count,
)
from ifedicl.federation_job.secagg import SecureFedAvg
from ifedicl.federation_job.strategies import ClientSelection, ClientUpdate, FedAvg, RoundId
from ifedicl.kernel.errors import FederationError
from ifedicl.kernel.sources import DataSource
from ifedicl.storage.store import Store

ROUND = RoundId("calibrate", 1, "round 1")


def _updates(values):
    return [ClientUpdate(i, np.asarray(v, np.float32), 10) for i, v in enumerate(values)]


def test_norm_screen_rejects_the_outlier_with_its_reason():
    honest = [np.full((2, 2, 2), x) for x in (1.0, 1.1, 0.9, 1.05)]
    kept, rejected = NormScreen(10.0)(_updates([*honest, np.full((2, 2, 2), 50.0)]))
    assert [u.client_id for u in kept] == [0, 1, 2, 3]
    assert list(rejected) == [4] and "x round median" in rejected[4]


def test_norm_screen_measures_lambda_from_the_round_reference():
    start = np.ones((2, 2, 2))
    flipped = -start  # same norm as an honest Λ, huge delta
    updates = _updates([start + 0.01, start - 0.02, start + 0.015, flipped])
    assert NormScreen(10.0)(updates)[1] == {}  # measured from zero the flip hides
    assert list(NormScreen(10.0)(updates, start)[1]) == [3]


def test_trimmed_mean_and_median_ignore_one_extreme_client():
    values = np.array([[1.0], [2.0], [3.0], [4.0], [1000.0]])
    assert trim_count(5, 0.2) == 1 and trim_count(2, 0.4) == 0
    assert coordinate_trimmed_mean(values, 0.2)[0] == 3.0
    assert CoordinateMedian().aggregate(ROUND, _updates(values)).value[0] == 3.0
    assert TrimmedMean(0.2).aggregate(ROUND, _updates(values)).value[0] == 3.0
    assert FedAvg().aggregate(ROUND, _updates(values)).value[0] == np.float32(202.0)


def test_the_norm_screen_wraps_any_strategy_and_records_what_it_rejected():
    values = [np.full((2, 2, 2), x) for x in (1.0, 1.1, 0.9, 1.05, 50.0)]
    for rule in (FedAvg(), CoordinateMedian(), TrimmedMean(0.0)):
        result = Screened(rule, NormScreen(10.0)).aggregate(ROUND, _updates(values))
        assert [u.client_id for u in result.used] == [0, 1, 2, 3] and list(result.dropped) == [4]
        assert result.value.max() < 1.2  # the outlier never reached the rule
    strict = Screened(FedAvg(selection=ClientSelection(min_clients=5)), NormScreen(10.0))
    with pytest.raises(FederationError, match="calibrate round 1 after screening: only 4 client"):
        strict.aggregate(ROUND, _updates(values))


def test_one_factory_builds_the_strategies_the_settings_ask_for():
    def built(**kw):
        # robust rules aggregate local steps' Λ (the second-order round pools statistics by their mean)
        settings = FederationSettings(clients=4, min_clients=2, stage2="local-steps", **kw)
        strategies = build_strategies(settings, transport=None, num_classes=2)
        return strategies.vectors, strategies.coefficients

    vectors, coefficients = built(fraction=0.5, aggregator="trimmed-mean", trim_fraction=0.2)
    assert isinstance(coefficients, Screened) and isinstance(coefficients.inner, TrimmedMean)
    assert coefficients.inner.trim_fraction == 0.2 and coefficients.screen == NormScreen(10.0)
    assert coefficients.selection == ClientSelection(0.5, 2) and vectors.selection == ClientSelection(1.0, 2)
    assert isinstance(built(aggregator="median")[1].inner, CoordinateMedian)
    vectors, coefficients = built(weighted_coefficients=True)
    assert isinstance(coefficients.inner, FedAvg) and coefficients.weighted and not vectors.weighted
    vectors, coefficients = built(secagg=True, weighted_vectors=True)
    assert isinstance(vectors, SecureFedAvg) and vectors.weighted and isinstance(coefficients, SecureFedAvg)
    assert coefficients.configure([0, 1, 2], np.random.default_rng(0)).instructions == {
        "secagg": True,
        "weighted": False,
    }


def _settings(**kw) -> FederationSettings:
    base = dict(
        clients=5,
        alpha=100.0,
        rounds=1,
        min_clients=3,
        round_timeout_s=120,
        min_shard=4,
        adversaries={4: "scale:50,flip"},
        stage2="local-steps",  # the robust rules' Λ rounds
    )
    return FederationSettings(**{**base, **kw})


def _uploads(payloads: dict[int, bytes], key: str, coding: str = "float32") -> list[ClientUpdate]:
    """Every client's upload as the server decodes it, the adversary's (client 4) included."""
    from ifedicl.federation_job import wire
    from ifedicl.federation_job.vector_coding import upload_reader

    def value(cid: int, payload: bytes) -> np.ndarray:
        if key == "vectors":  # in the run's stage-1 coding (int8 by default)
            return upload_reader(coding)(payload, cid)[0]
        return wire.decode(payload)[0][key]

    return [ClientUpdate(cid, value(cid, p), 10) for cid, p in sorted(payloads.items())]


def _gap(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_one_adversary_moves_the_mean_but_not_the_median_and_the_screen_rejects_it(
    ray_session, llama_dir, task_dir, tmp_path
):
    """One real federation, screened; the mean and the median are taken of the same uploads the server got."""
    seen = {}

    def record(stage, round_index, results, actors):
        seen[(stage, round_index)] = results

    settings = _settings(aggregator="trimmed-mean", trim_fraction=0.0)
    source = DataSource(str(task_dir), max_train=50, max_test=0)
    screened = Federation(str(llama_dir), source, str(tmp_path / "screen"), settings, None, record).run()
    vectors = _uploads(seen[("extract", 0)], "vectors", settings.vector_coding)
    coefficients = _uploads(seen[("calibrate", 1)], "coefficients")
    assert [u.client_id for u in vectors] == [u.client_id for u in coefficients] == [0, 1, 2, 3, 4]
    hv, hc = (np.mean([u.values for u in ups if u.client_id != 4], axis=0) for ups in (vectors, coefficients))

    mean_vectors, mean_coefficients = (FedAvg().aggregate(ROUND, ups).value for ups in (vectors, coefficients))
    assert _gap(mean_vectors, hv) > 5 and _gap(mean_coefficients, hc) > 0.3  # scaled x50, flipped Λ win
    median_vectors, median_coefficients = (
        CoordinateMedian().aggregate(ROUND, ups).value for ups in (vectors, coefficients)
    )
    assert _gap(median_vectors, hv) < 0.25 and _gap(median_coefficients, hc) < 0.05

    for record in screened.rounds:
        assert record.clients_answered == [0, 1, 2, 3]
        assert "x round median" in record.dropped[4]
    np.testing.assert_allclose(screened.vectors, hv, rtol=1e-5, atol=1e-6)  # trim 0 = the honest mean exactly
    np.testing.assert_allclose(screened.coefficients, hc, rtol=1e-5, atol=1e-6)
    store = Store(tmp_path / "screen")
    rows = store.rounds(screened.run_id)
    assert "x round median" in json.loads(rows[1]["dropped"])["4"]
    summary = json.loads(store.run_row(screened.run_id)["summary"])
    assert set(summary["rejected"]) == {"0", "1"} and summary["aggregation"]["aggregator"] == "trimmed-mean"
