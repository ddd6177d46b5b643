"""Secure aggregation: masks cancel exactly, single uploads hide the value, dropouts redo the masking."""

import numpy as np
import pytest
import ray
from actor_kills import kill_and_wait

from ifedicl.federation_job import wire
from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.federation_job.exchange import Exchange
from ifedicl.federation_job.secagg import (
    FRACTION_BITS,
    MaskingClient,
    SecureFedAvg,
    decode_fixed,
    encode_fixed,
    unmask_sum,
)
from ifedicl.federation_job.strategies import ClientSelection, RoundId
from ifedicl.kernel.errors import FederationError
from ifedicl.kernel.sources import DataSource


def _cohort(values: dict[int, np.ndarray], context: bytes = b"t|1|0"):
    clients = {cid: MaskingClient(cid) for cid in values}
    keys = {cid: c.public_key() for cid, c in clients.items()}  # what the server relays
    return {cid: clients[cid].mask(values[cid], keys, context) for cid in values}


def test_masked_sum_equals_plain_sum_and_no_upload_is_the_value():
    rng = np.random.default_rng(0)
    values = {cid: rng.normal(0, 3, size=(4, 2, 16)).astype(np.float32) for cid in (0, 3, 7)}
    uploads = _cohort(values)
    total = unmask_sum(list(uploads.values()), (4, 2, 16))
    exact = sum(decode_fixed(encode_fixed(v)) for v in values.values())  # the same fixed-point values, summed
    assert np.array_equal(total, exact)  # masks cancel exactly in the ring
    np.testing.assert_allclose(total, sum(v.astype(np.float64) for v in values.values()), atol=3 * 2.0**-FRACTION_BITS)
    for cid, upload in uploads.items():
        seen = decode_fixed(upload).reshape(4, 2, 16)
        assert not np.allclose(seen, values[cid], atol=1.0)  # the server sees noise, not the value
        assert np.abs(seen).mean() > 1e9  # masks are uniform over the ring


def test_missing_member_leaves_masks_uncancelled_and_fresh_keys_differ():
    values = {cid: np.full((2, 2, 2), float(cid), np.float32) for cid in range(3)}
    uploads = _cohort(values)
    partial = unmask_sum([uploads[0], uploads[1]], (2, 2, 2))
    assert np.abs(partial - 1.0).max() > 1e6  # without client 2 the sum is garbage: the driver must redo
    again = _cohort(values)
    assert not np.array_equal(again[0], uploads[0])  # a redo uses fresh keys, never the same masks


def test_cohort_of_one_is_refused():
    client = MaskingClient(0)
    with pytest.raises(FederationError, match="cohort of 1"):
        client.mask(np.zeros(3), {0: client.public_key()}, b"x")


def test_a_tampered_key_list_is_refused():
    a, b = MaskingClient(0), MaskingClient(1)
    with pytest.raises(FederationError, match="own key"):
        a.mask(np.zeros(3), {0: b.public_key(), 1: b.public_key()}, b"x")
    with pytest.raises(FederationError, match="duplicate"):
        a.mask(np.zeros(3), {0: a.public_key(), 1: a.public_key()}, b"x")


def test_out_of_range_values_are_refused():
    with pytest.raises(FederationError, match="fixed-point"):
        encode_fixed(np.array([np.nan]))


def _settings(**kw) -> FederationSettings:
    # one host per client (--actors 3): a kill takes one client
    base = dict(clients=3, actors=3, alpha=1.0, rounds=1, min_clients=2, round_timeout_s=120, min_shard=4)
    return FederationSettings(**{**base, **kw})


def test_secagg_federation_matches_plain_and_survives_a_drop_after_keys(ray_session, llama_dir, task_dir, tmp_path):
    """Client 2 dies after keys are agreed in round 1: masking is redone without it, fresh keys."""
    source = DataSource(str(task_dir), max_train=40, max_test=0)
    seen: dict[tuple[str, int], dict[int, bytes]] = {}

    def record_and_kill_2_after_keys(stage, round_index, results, actors):
        seen[(stage, round_index)] = results
        # Keys of round 1 are agreed (gathered): client 2 dies before its masked upload is asked for.
        # Killed here and waited for, not after the upload's dispatch, where a fast upload could win the race.
        if stage == "calibrate-keys" and round_index == 1 and 2 in actors and "killed" not in seen:
            kill_and_wait(actors[2])
            seen["killed"] = {}

    fed = Federation(
        str(llama_dir), source, str(tmp_path / "s"), _settings(secagg=True), None, record_and_kill_2_after_keys
    )
    secure = fed.run()
    assert "after masks were agreed" in secure.rounds[1].dropped[2]
    assert secure.rounds[1].clients_answered == [0, 1]
    # no single upload carries a client's real value: plain-stage answers hold only counts ...
    assert all(wire.decode(p)[0] == {} for p in seen[("extract", 0)].values())
    assert all(wire.decode(p)[0] == {} for p in seen[("calibrate", 1)].values())
    # ... and each masked vector upload is far from the global mean (it is uniform in the ring)
    for payload in seen[("extract-masked", 0)].values():
        masked = decode_fixed(wire.decode(payload)[0]["masked"]).reshape(secure.vectors.shape)
        assert np.abs(masked - secure.vectors).mean() > 1e6
    assert secure.summary["round_bytes_up_per_client"] > 16 * fed.fingerprint.num_layers

    # the same run in the clear (float32 vectors, as secagg sums them), client 2 lost in round 1 too:
    # same vectors and Λ up to fixed-point rounding
    def kill_2(stage, round_index, actors):
        if stage == "calibrate" and round_index == 1 and 2 in actors:
            ray.kill(actors[2])

    plain = Federation(str(llama_dir), source, str(tmp_path / "p"), _settings(vector_coding="float32"), kill_2).run()
    np.testing.assert_allclose(secure.vectors, plain.vectors, atol=1e-5)
    np.testing.assert_allclose(secure.coefficients, plain.coefficients, atol=1e-5)


def test_weighted_secure_mean_equals_weighted_fedavg(llama_dir, task_dir):
    """Client actors (in-process, real model) mask N_k * v_k; the server divides the sum by the public sum of N_k."""
    import torch
    from hosting import hosted_client

    from ifedicl.federation_job.strategies import ClientUpdate, FedAvg, RoundId

    threads = torch.get_num_threads()  # an actor pins its process to OMP_NUM_THREADS; restore for later tests
    source = DataSource(str(task_dir), max_train=30, max_test=0)
    actors = {cid: hosted_client(llama_dir, source, rows, cid) for cid, rows in
              enumerate([list(range(0, 4)), list(range(4, 13)), list(range(13, 30))])}  # fmt: skip
    plain = {cid: wire.decode(a.extract(wire.encode({}, batch_size=8)))[0]["vectors"] for cid, a in actors.items()}
    counts = {cid: len(a.client.data) for cid, a in actors.items()}
    torch.set_num_threads(threads)
    for actor in actors.values():
        assert wire.decode(actor.extract(wire.encode({}, batch_size=8, secagg=True, weighted=True)))[0] == {}
    keys = {cid: wire.decode(a.secagg_keys(b""))[0]["public_key"] for cid, a in actors.items()}
    request = wire.encode({"public_keys": np.stack([keys[c] for c in sorted(keys)])}, cohort=sorted(keys), context="w")
    uploads = [wire.decode(a.secagg_upload(request))[0]["masked"] for a in actors.values()]
    shape = plain[0].shape
    secure = unmask_sum(uploads, shape) / sum(counts.values())
    updates = [ClientUpdate(c, v, counts[c]) for c, v in plain.items()]
    expected = FedAvg(weighted=True).aggregate(RoundId("extract", 0, "stage 1"), updates).value
    np.testing.assert_allclose(secure, expected, atol=1e-5)


class InProcessCohort:
    """A transport to in-process clients (real key agreement and masking); ``lose`` vanishes before its upload once."""

    session = "in-process"

    def __init__(self, values: dict[int, np.ndarray], lose: int | None = None):
        self.values, self.lose = values, lose
        self.maskers: dict[int, MaskingClient] = {}
        self.key_rounds = 0
        self.excluded: set[int] = set()

    def call(self, stage, round_index, method, requests):
        if method == "secagg_keys":
            self.key_rounds += 1
            self.maskers = {cid: MaskingClient(cid) for cid in requests}
            answers = {cid: wire.encode({"public_key": m.public_key()}) for cid, m in self.maskers.items()}
            return Exchange.of(requests, answers, {})
        answers, dropped = {}, {}
        for cid, request in requests.items():  # secagg_upload
            if cid == self.lose:
                dropped[cid], self.lose = "client died (RayActorError)", None
                continue
            arrays, meta = wire.decode(request)
            peers = dict(zip(meta["cohort"], arrays["public_keys"]))
            masked = self.maskers[cid].mask(self.values[cid], peers, str(meta["context"]).encode())
            answers[cid] = wire.encode({"masked": masked})
        return Exchange.of(requests, answers, dropped)

    def exclude(self, client_id: int) -> None:
        self.excluded.add(client_id)


def test_secure_fedavg_strategy_redoes_the_masking_without_a_member_lost_after_the_keys():
    rng = np.random.default_rng(0)
    values = {cid: rng.normal(size=(3, 2, 2)) for cid in range(3)}
    cohort = InProcessCohort(values, lose=2)
    strategy = SecureFedAvg(cohort, selection=ClientSelection(min_clients=2))
    updates, rejected = strategy.decode(
        {cid: wire.encode({}, num_examples=5) for cid in values}, "coefficients", (3, 2, 2)
    )  # masked: the plain answers carry only counts
    assert rejected == {} and all(not u.values.any() for u in updates)
    result = strategy.aggregate(RoundId("calibrate", 1, "round 1"), updates)
    np.testing.assert_allclose(result.value, (values[0] + values[1]) / 2, atol=1e-6)
    assert [u.client_id for u in result.used] == [0, 1] and cohort.key_rounds == 2  # fresh keys for the redo
    assert list(result.dropped) == [2] and "after masks were agreed" in result.dropped[2]
    assert cohort.excluded == {2} and result.traffic.up[2] > 0 and result.traffic.down[0] > result.traffic.down[2]
    with pytest.raises(FederationError, match="only 1 client.*min_clients=2"):
        strategy.aggregate(RoundId("calibrate", 2, "round 2"), updates[:1])


def test_a_secure_run_is_published_only_after_a_held_out_evaluation_not_below_zero_shot(
    ray_session, llama_dir, task_dir, tmp_path
):
    """The server never sees one client's Λ under --secagg: a garbage sum within the value bound is caught only
    by what it does. No held-out evaluation, or one below zero-shot: the run completes but is not published."""
    from ifedicl.storage.store import Store

    store_dir = tmp_path / "s"
    source = DataSource(str(task_dir), max_train=40, max_test=0)  # nothing held out to check the sum against
    fed = Federation(str(llama_dir), source, str(store_dir), _settings(secagg=True))
    result = fed.run(publish=True)
    assert not result.published and "held-out evaluation" in result.summary["publish_refused"]
    store = Store(store_dir)
    assert store.run_row(result.run_id)["status"] == "complete" and store.published() == {}
    assert "below zero-shot" in fed._publish_refusal({"accuracy": 0.4, "zero_shot_accuracy": 0.5})
    assert fed._publish_refusal({"accuracy": 0.5, "zero_shot_accuracy": 0.5}) is None
    plain = Federation(str(llama_dir), source, str(tmp_path / "p"), _settings())
    assert plain._publish_refusal({}) is None  # in the clear the norm screen sees each update
