"""Server math: means, FedAvg, the Dirichlet split, and the wire format's byte count."""

import numpy as np
import pytest

from ifedicl.federation_job import wire
from ifedicl.federation_job.partition import dirichlet_partition
from ifedicl.federation_job.strategies import (
    ClientSelection,
    ClientUpdate,
    FedAvg,
    RoundId,
    check_update,
    sample_clients,
)
from ifedicl.kernel.errors import DataError, FederationError

ROUND = RoundId("calibrate", 1, "round 1")


def _mean(strategy, updates):
    return strategy.aggregate(ROUND, updates).value


def _updates():
    return [
        ClientUpdate(0, np.full((2, 2, 2), 1.0, np.float32), num_examples=1),
        ClientUpdate(1, np.full((2, 2, 2), 4.0, np.float32), num_examples=3),
    ]


def test_unweighted_mean_is_exact():
    assert np.array_equal(_mean(FedAvg(weighted=False), _updates()), np.full((2, 2, 2), 2.5, np.float32))


def test_weighted_mean_is_exact():
    assert np.array_equal(_mean(FedAvg(weighted=True), _updates()), np.full((2, 2, 2), 3.25, np.float32))


def test_fedavg_of_coefficients_matches_numpy():
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(4, 2, 2)).astype(np.float32) for _ in range(5)]
    updates = [ClientUpdate(i, v, 10) for i, v in enumerate(values)]
    np.testing.assert_allclose(_mean(FedAvg(), updates), np.mean(values, axis=0), rtol=1e-6)


def test_the_strategy_owns_sampling_and_the_minimum_count():
    strategy = FedAvg(selection=ClientSelection(fraction=0.5, min_clients=3))
    plan = strategy.configure({0, 1, 2, 3, 4, 5, 6, 7}, np.random.default_rng(0))
    assert len(plan.clients) == 4 and set(plan.clients) <= set(range(8))
    assert plan.instructions == {"secagg": False, "weighted": False}
    assert len(strategy.configure({0, 1, 2, 3}, np.random.default_rng(0)).clients) == 3  # never below the minimum
    used = strategy.aggregate(ROUND, [ClientUpdate(c, np.ones((2, 2, 2), np.float32), 1) for c in (0, 1, 2)]).used
    assert [u.client_id for u in used] == [0, 1, 2]
    with pytest.raises(FederationError, match="round 1: only 2 client.*min_clients=3"):
        strategy.aggregate(ROUND, _updates())


def test_decode_records_bad_uploads_as_rejections():
    good = wire.encode({"coefficients": np.ones((2, 2, 2), np.float32)}, num_examples=3, loss=0.5)
    nan = wire.encode({"coefficients": np.full((2, 2, 2), np.nan, np.float32)}, num_examples=3)
    updates, rejected = FedAvg().decode({0: good, 1: b"garbage", 2: nan}, "coefficients", (2, 2, 2))
    assert [(u.client_id, u.num_examples, u.loss) for u in updates] == [(0, 3, 0.5)]
    assert "undecodable" in rejected[1] and "non-finite" in rejected[2]


def test_bad_updates_are_rejected():
    with pytest.raises(FederationError, match="shape"):
        check_update(ClientUpdate(3, np.zeros((1, 2, 2), np.float32), 1), (2, 2, 2))
    with pytest.raises(FederationError, match="non-finite"):
        check_update(ClientUpdate(3, np.full((2, 2, 2), np.nan, np.float32), 1), (2, 2, 2))


def test_dirichlet_split_covers_every_example_once_and_is_reproducible():
    labels = [i % 4 for i in range(400)]
    shards = dirichlet_partition(labels, num_clients=10, alpha=0.5, seed=7, min_size=5)
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(400))
    assert all(len(s) >= 5 for s in shards)
    assert shards == dirichlet_partition(labels, num_clients=10, alpha=0.5, seed=7, min_size=5)
    assert shards != dirichlet_partition(labels, num_clients=10, alpha=0.5, seed=8, min_size=5)


def test_small_alpha_skews_labels():
    labels = [i % 2 for i in range(1000)]
    shards = dirichlet_partition(labels, num_clients=5, alpha=0.1, seed=0)
    purity = [max(np.bincount([labels[i] for i in s], minlength=2)) / len(s) for s in shards]
    assert np.mean(purity) > 0.75


def test_impossible_split_is_a_clear_error():
    with pytest.raises(DataError, match="cannot give"):
        dirichlet_partition([0, 1, 0], num_clients=5, alpha=0.5, min_size=1)


def test_sampling_respects_fraction_and_minimum():
    rng = np.random.default_rng(0)
    assert len(sample_clients(list(range(10)), 0.3, 1, rng)) == 3
    assert len(sample_clients(list(range(10)), 0.1, 4, rng)) == 4


def test_wire_round_trip_and_size():
    coeffs = np.arange(16, dtype=np.float32).reshape(4, 2, 2)
    payload = wire.encode({"coefficients": coeffs}, num_examples=7, loss=0.5)
    arrays, meta = wire.decode(payload)
    assert np.array_equal(arrays["coefficients"], coeffs) and meta == {"num_examples": 7, "loss": 0.5}
    assert 64 < len(payload) < 64 + 200  # 4L float32 plus a small header
    with pytest.raises(FederationError, match="undecodable"):
        wire.decode(b"garbage")
