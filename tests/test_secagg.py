"""Secure aggregation with double masking and dropout recovery (issue 31, item 2).

Protocol level: real :class:`MaskingClient` objects (real X25519, Shamir, ChaCha20-Poly1305) behind an
in-process transport that delivers, loses, delays or tampers with the real wire messages; the server is
the real :class:`SecureFedAvg`. End to end: the Ray federation, clients killed between the protocol's steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
from actor_kills import kill_and_wait
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ifedicl.federation_job import wire
from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.federation_job.exchange import Exchange
from ifedicl.federation_job.secagg import (
    CIPHERTEXT_BYTES,
    FRACTION_BITS,
    MaskingClient,
    SecureFedAvg,
    combine_secret,
    decode_fixed,
    encode_fixed,
    pair_mask,
    ring_sum,
    self_mask,
    threshold_for,
)
from ifedicl.federation_job.strategies import ClientSelection, ClientUpdate, RoundId
from ifedicl.kernel.errors import FederationError
from ifedicl.kernel.sources import DataSource

SHAPE = (3, 2, 2)  # Λ [L, 2, 2]
AT = RoundId("calibrate", 1, "round 1")
STEPS = ("secagg_keys", "secagg_share", "secagg_upload", "secagg_unmask")
RESOLUTION = 2.0**-FRACTION_BITS


class LocalCohort:
    """The server's transport to in-process masking clients; every message really crosses as bytes.

    ``lose[method]``: clients that vanish at that request (no answer, reported as died).
    ``late``: clients whose masked upload comes after the deadline: reported as timed out, kept in ``late_uploads``.
    ``tamper[method]``: (client, answer bytes) -> the bytes the server gets instead.
    ``log``: every (method, client, request, answer) the server sent and received: all it ever sees.
    """

    session = "in-process"

    def __init__(self, values, lose=None, late=(), tamper=None):
        self.values = values
        self.lose = {m: set(c) for m, c in (lose or {}).items()}
        self.late, self.late_uploads = set(late), {}
        self.tamper = tamper or {}
        self.clients: dict[int, MaskingClient] = {}
        self.log: list[tuple[str, int, bytes, bytes | None]] = []
        self.excluded: set[int] = set()

    def call(self, stage, round_index, method, requests):
        if method == "secagg_keys":
            self.clients = {cid: MaskingClient(cid, self.values[cid]) for cid in requests}
        answers, dropped = {}, {}
        for cid, request in sorted(requests.items()):
            if cid in self.lose.get(method, ()):
                dropped[cid] = "client died (RayActorError)"
                self.log.append((method, cid, request, None))
                continue
            try:
                answer = getattr(self.clients[cid], method)(request)
            except FederationError as err:
                dropped[cid] = f"client failed: {err}"
                continue
            if method == "secagg_upload" and cid in self.late:
                self.late_uploads[cid] = answer  # it does arrive, after the server gave up on it
                dropped[cid] = "no answer within round_timeout_s=120"
                self.log.append((method, cid, request, None))
                continue
            if method in self.tamper:
                answer = self.tamper[method](cid, answer)
            answers[cid] = answer
            self.log.append((method, cid, request, answer))
        return Exchange.of(requests, answers, dropped)

    def exclude(self, client_id: int) -> None:
        self.excluded.add(client_id)

    def answers(self, method: str) -> dict[int, bytes]:
        return {cid: a for m, cid, _, a in self.log if m == method and a is not None}


def _values(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {cid: rng.normal(0, 3, size=SHAPE) for cid in range(n)}


def _updates(values, counts=None) -> list[ClientUpdate]:
    return [ClientUpdate(cid, np.zeros(SHAPE, np.float32), (counts or {}).get(cid, 5)) for cid in sorted(values)]


def _aggregate(cohort: LocalCohort, **kw):
    strategy = SecureFedAvg(cohort, selection=ClientSelection(min_clients=2), **kw)
    return strategy.aggregate(AT, _updates(cohort.values))


def _exact_mean(values, members) -> np.ndarray:
    """The mean of the members' fixed-point values, as the ring sum carries them."""
    return sum(decode_fixed(encode_fixed(values[c])) for c in members) / len(members)


# ------------------------------------------------------------------------------------------------ happy path
def test_the_unmasked_sum_is_exact_and_no_message_carries_a_value():
    values = _values(4)
    cohort = LocalCohort(values)
    result = _aggregate(cohort)
    np.testing.assert_allclose(result.value, _exact_mean(values, range(4)), atol=RESOLUTION)
    np.testing.assert_allclose(result.value, sum(values.values()) / 4, atol=1e-6)
    assert [u.client_id for u in result.used] == [0, 1, 2, 3] and result.dropped == {}
    uploads = {cid: wire.decode(a)[0]["masked"] for cid, a in cohort.answers("secagg_upload").items()}
    for cid, upload in uploads.items():
        seen = decode_fixed(upload).reshape(SHAPE)
        assert np.abs(seen - values[cid]).mean() > 1e9  # uniform over the ring: nothing of the value shows
    # the raw ring sum still carries every self mask: only the unmasking step removes them
    assert np.abs(decode_fixed(ring_sum(list(uploads.values()), 12))).mean() > 1e9
    # each step crossed as counted bytes, both ways, for every client
    assert all(result.traffic.up[c] > 8 * 12 and result.traffic.down[c] > 4 * 64 for c in range(4))


def test_threshold_is_a_majority_never_below_two():
    assert [threshold_for(n) for n in (2, 3, 4, 5, 10, 11)] == [2, 2, 3, 3, 6, 6]
    assert threshold_for(10, 2 / 3) == 7 and threshold_for(3, 0.9) == 3
    with pytest.raises(FederationError, match=r"\[0.5, 1\)"):
        SecureFedAvg(None, threshold=0.4)


def test_weighted_mode_divides_the_recovered_sum_by_the_uploaders_counts():
    values = _values(4, seed=3)
    counts = {0: 2, 1: 7, 2: 11, 3: 4}
    weighted = {cid: v * counts[cid] for cid, v in values.items()}  # what a client masks: N_k * x_k
    cohort = LocalCohort(weighted, lose={"secagg_upload": {1}})
    strategy = SecureFedAvg(cohort, weighted=True, selection=ClientSelection(min_clients=2))
    result = strategy.aggregate(AT, _updates(values, counts))
    members = [0, 2, 3]
    expected = sum(weighted[c] for c in members) / sum(counts[c] for c in members)
    np.testing.assert_allclose(result.value, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------- the straggler
def test_a_late_upload_of_a_client_declared_dropped_tells_the_server_nothing():
    """Client 3's masked upload arrives after the server declared it dropped. The server holds every message:
    the survivors' exact sum, 3's late upload, the s shares of 3 (so 3's key and pairwise masks), every other
    share it was given. Stripping 3's pairwise masks from its upload -- which under the old pairwise-only design
    gave its value exactly (there: first attempt's sum minus the redo's) -- leaves 3's value under its self mask,
    uniform over the ring; no survivor gave a share of 3's self-mask seed, and asked again, each refuses."""
    values = _values(4, seed=1)
    cohort = LocalCohort(values, late={3})
    result = _aggregate(cohort)
    np.testing.assert_allclose(result.value, _exact_mean(values, [0, 1, 2]), atol=RESOLUTION)
    assert "before its masked upload" in result.dropped[3]
    size, context = int(np.prod(SHAPE)), f"{cohort.session}|{AT.stage}|{AT.index}".encode()

    late = wire.decode(cohort.late_uploads[3])[0]["masked"]
    unmasking = {cid: wire.decode(a) for cid, a in cohort.answers("secagg_unmask").items()}
    cohort_ids = sorted(cohort.clients)
    s_shares, b_shares_of_3 = {}, 0
    for cid, (arrays, meta) in unmasking.items():
        assert 3 not in meta["b_peers"] and meta["s_peers"] == [3]
        s_shares[cohort_ids.index(cid) + 1] = arrays["s_shares"][0].tobytes()
        b_shares_of_3 += 3 in meta["b_peers"]
    assert b_shares_of_3 == 0 and len(s_shares) >= threshold_for(4)
    s3 = X25519PrivateKey.from_private_bytes(combine_secret(s_shares, threshold_for(4)))  # the server has 3's key
    keys = wire.decode(cohort.log[[m for m, *_ in cohort.log].index("secagg_share")][2])[0]["s_keys"]
    best = late.copy()
    with np.errstate(over="ignore"):
        for u in (0, 1, 2):  # 3's pairwise masks with every peer it masked with, recomputed and removed
            best = best - pair_mask(s3, keys[u].tobytes(), 3, u, context, size)
    guess = decode_fixed(best).reshape(SHAPE)
    assert np.abs(guess - values[3]).min() > 1e3 and np.abs(guess).mean() > 1e9  # ring-uniform noise, not x_3
    with np.errstate(over="ignore"):  # (the removal itself is right: with b_3, which never left client 3, it is x_3)
        exact = best - self_mask(cohort.clients[3]._seed, context, 3, size)
    np.testing.assert_allclose(decode_fixed(exact).reshape(SHAPE), values[3], atol=RESOLUTION)
    # ... nor does combining everything else: the survivors' sum plus the late upload is noise as well
    assert np.abs(result.value * 3 + decode_fixed(late).reshape(SHAPE) - sum(values.values())).min() > 1e3

    # the server asks the survivors again, now naming 3 an uploader: every honest client refuses
    again = wire.encode({}, context=context.decode(), uploaded=[0, 1, 2, 3], dropped=[])
    for cid in (0, 1, 2):
        with pytest.raises(FederationError, match=r"both shares of clients \[3\]"):
            cohort.clients[cid].secagg_unmask(again)


# --------------------------------------------------------------------------------------- dropouts at each step
@pytest.mark.parametrize("step", STEPS)
def test_a_dropout_at_any_step_leaves_the_exact_sum_of_the_uploaders_in_the_same_round(step):
    values = _values(5, seed=2)
    cohort = LocalCohort(values, lose={step: {2}})
    result = _aggregate(cohort)
    members = [0, 1, 2, 3, 4] if step == "secagg_unmask" else [0, 1, 3, 4]  # after its upload: 2's value counts
    np.testing.assert_allclose(result.value, _exact_mean(values, members), atol=RESOLUTION)
    assert [u.client_id for u in result.used] == members
    if step == "secagg_unmask":
        assert result.dropped == {}  # in the sum; its self mask was removed with the others' shares
    else:
        where = {
            "secagg_keys": "before advertising its keys",
            "secagg_share": "after advertising keys, before sharing",
            "secagg_upload": "before its masked upload: its masks were removed",
        }[step]
        assert list(result.dropped) == [2] and where in result.dropped[2]


def test_dropouts_at_every_step_in_one_round():
    """8 clients: one lost at each step. U1 = 7 (t = 4), U2 = 6, U3 = 5, 4 answer the unmasking."""
    values = _values(8, seed=4)
    lose = {"secagg_keys": {0}, "secagg_share": {3}, "secagg_upload": {5}, "secagg_unmask": {6}}
    result = _aggregate(LocalCohort(values, lose=lose))
    members = [1, 2, 4, 6, 7]
    np.testing.assert_allclose(result.value, _exact_mean(values, members), atol=RESOLUTION)
    assert sorted(result.dropped) == [0, 3, 5]


@pytest.mark.parametrize(
    ("lose", "message"),
    [
        (
            {"secagg_share": {0, 1, 2}},
            "needs 3 of the 5 clients that advertised keys to have shared their secrets; only 2",
        ),
        ({"secagg_upload": {1, 2, 3}}, "needs 3 of the 5 .* uploaded a masked value; only 2"),
        ({"secagg_unmask": {0, 1, 4}}, "needs 3 of the 5 .* answered the unmasking; only 2"),
        ({"secagg_keys": {0, 1, 2, 3}}, "only 1 client"),
    ],
)
def test_below_the_threshold_the_round_fails_cleanly_naming_the_counts(lose, message):
    with pytest.raises(FederationError, match=message):
        _aggregate(LocalCohort(_values(5), lose=lose))


# ----------------------------------------------------------------------------- the client refuses the server
def _through_upload(n: int = 4, members=None):
    """n clients taken through keys, shares and their masked upload by hand -> (clients, context)."""
    values, context = _values(n), "refusals|calibrate|1"
    clients = {cid: MaskingClient(cid, values[cid]) for cid in range(n)}
    keys = {cid: wire.decode(c.secagg_keys(wire.encode({}, context=context)))[0] for cid, c in clients.items()}
    ids = sorted(clients)
    ring = {name: np.stack([keys[c][name.replace("_keys", "_public")] for c in ids]) for name in ("c_keys", "s_keys")}
    request = wire.encode(ring, context=context, cohort=ids, threshold=threshold_for(n))
    shared = {cid: wire.decode(c.secagg_share(request)) for cid, c in clients.items()}
    members = members or ids
    for cid in members:
        senders = [s for s in members if s != cid]
        rows = [shared[s][0]["ciphertexts"][shared[s][1]["recipients"].index(cid)] for s in senders]
        upload = wire.encode({"ciphertexts": np.stack(rows)}, context=context, cohort=members, senders=senders)
        assert wire.decode(clients[cid].secagg_upload(upload))[1]["bad_senders"] == []
    return clients, context


def _unmask(context: str, uploaded, dropped) -> bytes:
    return wire.encode({}, context=context, uploaded=list(uploaded), dropped=list(dropped))


def test_a_client_never_reveals_both_shares_of_one_peer():
    clients, context = _through_upload(4)
    with pytest.raises(FederationError, match=r"both shares of clients \[2\]"):
        clients[0].secagg_unmask(_unmask(context, [0, 1, 2, 3], [2]))
    first = wire.decode(clients[0].secagg_unmask(_unmask(context, [0, 1, 3], [2])))[1]
    assert first == {"b_peers": [0, 1, 3], "s_peers": [2]}
    assert wire.decode(clients[0].secagg_unmask(_unmask(context, [0, 1, 3], [2])))[1] == first  # a retry: same kinds
    with pytest.raises(FederationError, match=r"both shares of clients \[2\].*already revealed"):
        clients[0].secagg_unmask(_unmask(context, [0, 1, 2, 3], []))  # 2 "came back": its b share is never given
    with pytest.raises(FederationError, match=r"both shares of clients \[1, 2\]"):
        clients[0].secagg_unmask(_unmask(context, [0, 3, 2], [1]))


@pytest.mark.parametrize(
    ("uploaded", "dropped", "message"),
    [
        ([0, 1], [2, 3], "2 uploaders, fewer than the threshold 3"),
        ([1, 2, 3], [0], "does not count its own upload"),
        ([0, 1, 2], [], "not the clients it masked with"),
        ([0, 1, 2, 3, 9], [], "not the clients it masked with"),
        ([0, 1, 1, 2], [3], "names a client twice"),
    ],
)
def test_an_inconsistent_unmasking_request_is_refused(uploaded, dropped, message):
    clients, context = _through_upload(4)
    with pytest.raises(FederationError, match=message):
        clients[0].secagg_unmask(_unmask(context, uploaded, dropped))
    assert clients[0].revealed == {}  # a refused request reveals nothing


def test_inconsistent_key_lists_thresholds_and_masking_sets_are_refused():
    context = "refusals|calibrate|1"

    def advertised(n):
        clients = {cid: MaskingClient(cid, np.zeros(SHAPE)) for cid in range(n)}
        keys = {cid: wire.decode(c.secagg_keys(wire.encode({}, context=context)))[0] for cid, c in clients.items()}
        names = ("c_keys", "s_keys")
        ring = {name: np.stack([keys[c][name.replace("_keys", "_public")] for c in sorted(keys)]) for name in names}
        return clients, ring

    clients, ring = advertised(4)
    for threshold, message in ((2, "threshold 2 for a cohort of 4"), (1, "threshold 1"), (5, "threshold 5")):
        with pytest.raises(FederationError, match=message):  # t <= n/2 would let a server collect both kinds
            clients[0].secagg_share(wire.encode(ring, context=context, cohort=[0, 1, 2, 3], threshold=threshold))
    with pytest.raises(FederationError, match="cohort of 1"):
        clients[0].secagg_share(
            wire.encode({k: v[:1] for k, v in ring.items()}, context=context, cohort=[0], threshold=1)
        )
    swapped = {"c_keys": ring["c_keys"][[1, 1, 2, 3]], "s_keys": ring["s_keys"]}
    with pytest.raises(FederationError, match="own keys"):
        clients[0].secagg_share(wire.encode(swapped, context=context, cohort=[0, 1, 2, 3], threshold=3))
    with pytest.raises(FederationError, match="duplicate public keys"):
        clients[1].secagg_share(wire.encode(swapped, context=context, cohort=[0, 1, 2, 3], threshold=3))
    with pytest.raises(FederationError, match="another round"):
        clients[2].secagg_share(wire.encode(ring, context="other|calibrate|1", cohort=[0, 1, 2, 3], threshold=3))
    with pytest.raises(FederationError, match="out of order"):
        clients[3].secagg_upload(wire.encode({}, context=context, cohort=[0, 1, 2, 3], senders=[]))
    shares = wire.decode(clients[0].secagg_share(wire.encode(ring, context=context, cohort=[0, 1, 2, 3], threshold=3)))
    assert shares[1]["recipients"] == [1, 2, 3] and shares[0]["ciphertexts"].shape == (3, CIPHERTEXT_BYTES)
    with pytest.raises(FederationError, match="out of order"):  # one share per round: a second could differ
        clients[0].secagg_share(wire.encode(ring, context=context, cohort=[0, 1, 2, 3], threshold=3))
    too_few = wire.encode({"ciphertexts": np.zeros((1, CIPHERTEXT_BYTES), np.uint8)}, context=context, cohort=[0, 1],
                          senders=[1])  # fmt: skip
    with pytest.raises(FederationError, match="2 clients, fewer than the threshold 3"):
        clients[0].secagg_upload(too_few)
    outsider = wire.encode({"ciphertexts": np.zeros((0, CIPHERTEXT_BYTES), np.uint8)}, context=context,
                           cohort=[0, 1, 2, 7], senders=[])  # fmt: skip
    with pytest.raises(FederationError, match="advertised no keys"):
        clients[0].secagg_upload(outsider)


# ----------------------------------------------------------------------------------------- bad messages
def _flip(answer: bytes, offset: int = -40) -> bytes:
    """One byte of a payload's array data changed (the payload stays well-formed)."""
    raw = bytearray(answer)
    raw[offset] ^= 0xFF
    return bytes(raw)


def test_malformed_answers_at_each_step_are_rejected_and_recorded_and_the_round_goes_on():
    values = _values(8, seed=5)
    tamper = {
        "secagg_keys": lambda cid, a: a + b"\x00" * 4096 if cid == 0 else a,  # over the size limit
        "secagg_share": lambda cid, a: (
            wire.encode({"ciphertexts": np.zeros((3, CIPHERTEXT_BYTES), np.uint8)}, recipients=[1, 2, 3])
            if cid == 1
            else a
        ),  # wrong shape and recipients
        "secagg_upload": lambda cid, a: wire.encode({"masked": np.zeros(12)}) if cid == 2 else a,  # float64[12]
        "secagg_unmask": lambda cid, a: b"not safetensors" if cid == 3 else a,  # undecodable: that answer is ignored
    }
    cohort = LocalCohort(values, tamper=tamper)
    result = _aggregate(cohort)
    # 0, 1, 2 rejected (keys, shares, upload); t = 4 of U1 = 7, so 3's bad unmasking answer is spared
    members = [3, 4, 5, 6, 7]
    np.testing.assert_allclose(result.value, _exact_mean(values, members), atol=RESOLUTION)
    assert "rejected key advertisement" in result.dropped[0] and "at most" in result.dropped[0]
    assert "rejected secret shares" in result.dropped[1] and "exactly the other clients" in result.dropped[1]
    assert "rejected masked upload: masked upload of float64[12], expected uint64[12]" in result.dropped[2]
    assert sorted(result.dropped) == [0, 1, 2] and {0, 1, 2, 3} <= cohort.excluded


def test_a_share_that_does_not_decrypt_leaves_its_sender_out_and_the_round_goes_on():
    """Client 1's share for client 0 is altered in transit: 0 cannot open it and says so; the server leaves 1 out
    of the sum (its upload is not used, its pairwise masks are removed with its key rebuilt from the others)."""
    values = _values(5, seed=6)

    def garble_for_0(cid, answer):
        if cid != 1:
            return answer
        arrays, meta = wire.decode(answer)
        arrays["ciphertexts"] = arrays["ciphertexts"].copy()
        arrays["ciphertexts"][meta["recipients"].index(0), 20] ^= 1
        return wire.encode(arrays, **meta)

    cohort = LocalCohort(values, tamper={"secagg_share": garble_for_0})
    result = _aggregate(cohort)
    np.testing.assert_allclose(result.value, _exact_mean(values, [0, 2, 3, 4]), atol=RESOLUTION)
    assert "client(s) [0] could not open its share" in result.dropped[1]
    assert wire.decode(cohort.answers("secagg_upload")[0])[1]["bad_senders"] == [1]


def test_shares_from_strangers_or_relabelled_senders_are_rejected_by_the_client():
    context = "strangers|calibrate|1"
    fresh = {cid: MaskingClient(cid, np.ones(SHAPE)) for cid in range(4)}
    keys = {cid: wire.decode(c.secagg_keys(wire.encode({}, context=context)))[0] for cid, c in fresh.items()}
    ring = {
        name: np.stack([keys[c][name.replace("_keys", "_public")] for c in range(4)]) for name in ("c_keys", "s_keys")
    }
    shared = {cid: wire.decode(c.secagg_share(wire.encode(ring, context=context, cohort=[0, 1, 2, 3], threshold=3)))
              for cid, c in fresh.items()}  # fmt: skip
    to_0 = {s: shared[s][0]["ciphertexts"][shared[s][1]["recipients"].index(0)] for s in (1, 2, 3)}
    rows = np.stack([to_0[1], to_0[1], to_0[3], np.zeros(CIPHERTEXT_BYTES, np.uint8)])
    # 1's share relabelled as 2's (the AD binds the sender), 3 (not in the masking set), 99 (a stranger)
    request = wire.encode({"ciphertexts": rows}, context=context, cohort=[0, 1, 2], senders=[1, 2, 3, 99])
    answer = wire.decode(fresh[0].secagg_upload(request))
    assert answer[1]["bad_senders"] == [2, 3, 99] and answer[0]["masked"].dtype == np.uint64
    assert set(fresh[0].held) == {0, 1}  # only the genuine share from 1 (and its own) are kept


def test_a_wrong_share_in_the_unmasking_fails_the_round_cleanly():
    values = _values(3, seed=7)

    def corrupt(cid, answer):
        if cid != 0:
            return answer
        arrays, meta = wire.decode(answer)
        return wire.encode({k: np.bitwise_xor(v, 1).astype(np.uint8) for k, v in arrays.items()}, **meta)

    with pytest.raises(FederationError, match="self-mask seed do not rebuild it"):
        _aggregate(LocalCohort(values, tamper={"secagg_unmask": corrupt}))


def test_out_of_range_values_are_refused():
    with pytest.raises(FederationError, match="fixed-point"):
        encode_fixed(np.array([np.nan]))


# ------------------------------------------------------------------------------------------------ end to end
def _settings(**kw) -> FederationSettings:
    # one host per client (--actors 3): a kill takes one client
    base = dict(clients=3, actors=3, alpha=1.0, rounds=1, min_clients=2, round_timeout_s=120, min_shard=4)
    return FederationSettings(**{**base, **kw})


def test_secagg_federation_matches_plain_and_survives_a_drop_after_keys(ray_session, llama_dir, task_dir, tmp_path):
    """Client 2 dies after advertising its keys in round 1: the others' sum, same round, no redo."""
    source = DataSource(str(task_dir), max_train=40, max_test=0)
    seen: dict[tuple[str, int], dict[int, bytes]] = {}

    def record_and_kill_2_after_keys(stage, round_index, results, actors):
        seen[(stage, round_index)] = results
        # Keys of round 1 are advertised (gathered): client 2 dies before its shares are asked for.
        # Killed here and waited for, not after the next request's dispatch, where a fast answer could win the race.
        if stage == "calibrate-keys" and round_index == 1 and 2 in actors and "killed" not in seen:
            kill_and_wait(actors[2])
            seen["killed"] = {}

    fed = Federation(
        str(llama_dir), source, str(tmp_path / "s"), _settings(secagg=True), None, record_and_kill_2_after_keys
    )
    secure = fed.run()
    assert "after advertising keys, before sharing" in secure.rounds[1].dropped[2]
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


def test_a_client_killed_after_its_masked_upload_still_counts(ray_session, llama_dir, task_dir, tmp_path):
    """Client 2 dies after its masked Λ upload of round 1, before the unmasking: its self mask is removed with the
    other two's shares, so round 1's Λ is the mean of all three -- the run in the clear with nobody lost."""
    source = DataSource(str(task_dir), max_train=40, max_test=0)

    def kill_2_after_upload(stage, round_index, results, actors):
        if stage == "calibrate-masked" and round_index == 1 and 2 in actors:
            kill_and_wait(actors[2])

    secure = Federation(str(llama_dir), source, str(tmp_path / "s"), _settings(secagg=True), None, kill_2_after_upload)
    result = secure.run()
    assert result.rounds[1].clients_answered == [0, 1, 2] and result.rounds[1].dropped == {}
    assert 2 not in secure.alive  # never asked again
    plain = Federation(str(llama_dir), source, str(tmp_path / "p"), _settings(vector_coding="float32")).run()
    np.testing.assert_allclose(result.coefficients, plain.coefficients, atol=1e-5)


class HostedCohort:
    """A transport straight to in-process hosted clients (real model), as ClientHost.call would reach them."""

    session = "hosted"

    def __init__(self, hosted):
        self.hosted = hosted

    def call(self, stage, round_index, method, requests):
        return Exchange.of(requests, {c: getattr(self.hosted[c], method)(r) for c, r in requests.items()}, {})

    def exclude(self, client_id: int) -> None:
        raise AssertionError(f"client {client_id} excluded")


def test_weighted_secure_mean_equals_weighted_fedavg(llama_dir, task_dir):
    """Hosted clients (in-process, real model) mask N_k * v_k; the server divides the sum by the public sum of N_k."""
    import torch
    from hosting import hosted_client

    from ifedicl.federation_job.strategies import FedAvg

    threads = torch.get_num_threads()  # an actor pins its process to OMP_NUM_THREADS; restore for later tests
    source = DataSource(str(task_dir), max_train=30, max_test=0)
    actors = {cid: hosted_client(llama_dir, source, rows, cid) for cid, rows in
              enumerate([list(range(0, 4)), list(range(4, 13)), list(range(13, 30))])}  # fmt: skip
    plain = {cid: wire.decode(a.extract(wire.encode({}, batch_size=8)))[0]["vectors"] for cid, a in actors.items()}
    counts = {cid: len(a.client.data) for cid, a in actors.items()}
    torch.set_num_threads(threads)
    for actor in actors.values():
        assert wire.decode(actor.extract(wire.encode({}, batch_size=8, secagg=True, weighted=True)))[0] == {}
    strategy = SecureFedAvg(HostedCohort(actors), weighted=True, selection=ClientSelection(min_clients=2))
    shape = plain[0].shape
    updates = [ClientUpdate(c, np.zeros(shape, np.float32), counts[c]) for c in actors]
    secure = strategy.aggregate(RoundId("extract", 0, "stage 1"), updates).value
    expected = (
        FedAvg(weighted=True)
        .aggregate(RoundId("extract", 0, "stage 1"), [ClientUpdate(c, v, counts[c]) for c, v in plain.items()])
        .value
    )
    np.testing.assert_allclose(secure, expected, atol=1e-5)
    with pytest.raises(FederationError, match="out of order"):  # the round is over for these keys
        actors[0].secagg_share(wire.encode({}, context="hosted|extract|0"))
    # a value is masked once: a second aggregation of it over another cohort (the old redo) would give the
    # server two sums that differ by one member's value
    with pytest.raises(FederationError, match="nothing to aggregate"):
        actors[0].secagg_keys(wire.encode({}, context="hosted|extract|0|again"))


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


def test_the_threshold_flag_reaches_the_strategy_and_a_bad_one_names_the_flag():
    from ifedicl.federation_job.federation_settings import build_strategies
    from ifedicl.federation_job.options import FederationOptions
    from ifedicl.kernel.errors import IfediclError

    options = FederationOptions(secagg=True, min_clients=2, secagg_threshold=0.75)
    built = build_strategies(options.settings(0.5, 0), None, 2)
    # the default round: a trust-region step over the securely aggregated statistics
    assert built.coefficients.inner.threshold == 0.75 and built.vectors.threshold == 0.75
    with pytest.raises(IfediclError, match="--secagg-threshold must be in"):
        FederationOptions(secagg=True, min_clients=2, secagg_threshold=0.4).settings(0.5, 0).validate()
