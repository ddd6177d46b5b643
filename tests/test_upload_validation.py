"""Every client upload is validated before the server uses it (issue 31, item 3).

Real wire bytes (safetensors payloads, Λ frames, masked ring elements) through the real strategy
decode and the real secure aggregation: a bad upload is a recorded rejection of that client and
the round goes on with the others; a masked sum no honest cohort can produce fails the aggregation.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from ifedicl.federation_job import compute, wire
from ifedicl.federation_job.exchange import Exchange
from ifedicl.federation_job.secagg import MaskingClient, SecureFedAvg
from ifedicl.federation_job.strategies import MAX_ABS_VALUE, ClientSelection, FedAvg, RoundId
from ifedicl.federation_job.vector_coding import encode_vectors, upload_reader
from ifedicl.kernel.errors import FederationError

L, D = 4, 64
SHAPE = (L, 2, D)  # stage-1 vectors [L, 2, d]
LAMBDA = (L, 2, 2)


def _vectors(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)  # [L, 2, d]


def _raw(arrays: dict[str, np.ndarray], meta_json: str) -> bytes:
    """A safetensors upload whose metadata is exactly ``meta_json`` (what a tampered client can send)."""
    return save(arrays, metadata={"meta": meta_json})


def _decode_vectors(answers: dict[int, bytes], coding: str = "float32"):
    return FedAvg().decode(answers, "vectors", SHAPE, upload_reader(coding))


def _honest(cid: int, coding: str = "float32") -> bytes:
    return wire.encode(encode_vectors(_vectors(cid), coding), num_examples=10, compute={"cpu_s": 1.0, "wall_s": 2.0})


@pytest.mark.parametrize(
    ("meta_json", "match"),
    [
        ('{"num_examples": 1e400}', r"num_examples inf; expected an integer"),  # was an uncaught OverflowError
        ('{"num_examples": 2.5}', r"num_examples 2\.5"),  # was truncated to 2
        ('{"num_examples": true}', r"num_examples True"),  # was 1
        ('{"num_examples": -3}', r"num_examples -3"),
        ('{"num_examples": 4294967296}', r"num_examples 4294967296"),  # beyond the frame's u32
        ('{"num_examples": "7"}', r"num_examples '7'"),
        ('{"num_examples": 10, "loss": "x"}', r"loss 'x'; expected a finite number"),  # was accepted
        ('{"num_examples": 10, "loss": NaN}', r"loss nan"),
        ('{"num_examples": 10, "loss": 1e400}', r"loss inf"),
        ('{"num_examples": 10, "compute": {"cpu_s": -1, "wall_s": 1}}', r"compute cpu_s -1"),
        ('{"num_examples": 10, "compute": {"cpu_s": 1' + "0" * 400 + ', "wall_s": 1}}', r"compute cpu_s"),
        ('{"num_examples": 10, "compute": "fast"}', r"compute str"),
        ("[10]", r"metadata is a list"),
    ],
)
def test_a_malformed_count_loss_or_compute_report_is_a_rejection_and_the_round_goes_on(meta_json, match):
    bad = _raw({"vectors": _vectors(9)}, meta_json)
    updates, rejected = _decode_vectors({0: _honest(0), 1: bad, 2: _honest(2)})
    assert [u.client_id for u in updates] == [0, 2]
    assert list(rejected) == [1] and rejected[1].startswith("rejected update: ")
    assert __import__("re").search(match, rejected[1]), rejected[1]
    assert all(isinstance(u.num_examples, int) and u.num_examples == 10 for u in updates)


def test_a_compute_report_too_large_for_a_float_is_ignored_not_raised():
    """The driver notes every answer's compute (ray_pool): a 400-digit integer raised OverflowError there."""
    assert compute.reported({"compute": {"cpu_s": 10**400, "wall_s": 1.0}}) is None
    assert compute.reported({"compute": {"cpu_s": float("nan"), "wall_s": 1.0}}) is None
    assert compute.reported({"compute": {"cpu_s": 1.5, "wall_s": 2}}) == {"cpu_s": 1.5, "wall_s": 2.0}
    assert compute.reported(["not", "a", "dict"]) is None


def test_an_oversize_payload_is_refused_before_it_is_decoded():
    """A float32 upload padded with 10 MB of metadata: decoded and accepted before, now refused by size."""
    padded = wire.encode({"vectors": _vectors(1)}, num_examples=10, padding="x" * 10_000_000)
    limit = FedAvg().upload_limit(SHAPE)
    assert limit == wire.upload_limit(L * 2 * D, tensors=2) and len(_honest(0)) < limit < len(padded)
    updates, rejected = _decode_vectors({0: _honest(0), 1: padded})
    assert [u.client_id for u in updates] == [0]
    assert f"client 1 sent {len(padded)} bytes; this upload is at most {limit} bytes" in rejected[1]
    with pytest.raises(FederationError, match="at most 100 bytes"):
        wire.decode(padded, limit=100)
    assert wire.meta_of(padded) == {}  # the compute note does not parse a header over 1 MiB either
    # every coding of an honest upload fits its limit, int8 included
    for coding in ("float32", "float16", "int8"):
        assert _decode_vectors({0: _honest(0, coding)}, coding)[1] == {}


def test_wrong_dtype_shape_and_values_are_rejections():
    default_reader = FedAvg()  # no reader: the named safetensors array, as it arrives
    answers = {
        0: wire.encode({"coefficients": np.ones(LAMBDA, np.float32)}, num_examples=3),
        1: wire.encode({"coefficients": np.ones(LAMBDA, np.int32)}, num_examples=3),  # was accepted
        2: wire.encode({"coefficients": np.ones((L, 2, 3), np.float32)}, num_examples=3),
        3: wire.encode({"coefficients": np.full(LAMBDA, 3e38, np.float32)}, num_examples=3),  # finite, absurd
        4: wire.encode({"coefficients": np.full(LAMBDA, np.nan, np.float32)}, num_examples=3),
        5: b"\x00" * 40,
    }
    updates, rejected = default_reader.decode(answers, "coefficients", LAMBDA)
    assert [u.client_id for u in updates] == [0]
    assert "values of type int32, expected floats" in rejected[1]
    assert "shape (4, 2, 3), expected (4, 2, 2)" in rejected[2]
    assert f"magnitude 3e+38 > {MAX_ABS_VALUE:g}" in rejected[3]
    assert "non-finite values" in rejected[4]
    assert "undecodable update" in rejected[5]


def _frame(loss: float, cpu: float = 1.0, wall: float = 1.0, num_examples: int = 5) -> bytes:
    """A Λ frame packed by hand: an honest encoder refuses nothing of this, a tampered client sends it."""
    header = wire.FRAME_HEADER.pack(wire.FRAME_MAGIC, wire.FRAME_VERSION, 3, L, num_examples, loss, cpu, wall)
    return header + np.ones(LAMBDA, "<f4").tobytes()


def test_lambda_frames_with_a_nan_loss_or_compute_or_no_examples_are_rejections():
    answers = {
        0: wire.encode_coefficients(np.ones(LAMBDA), 5, loss=0.7, compute={"cpu_s": 1.0, "wall_s": 1.0}),
        1: _frame(float("nan")),  # was accepted: the round's mean loss became NaN
        2: _frame(float("inf")),
        3: _frame(0.5, cpu=float("nan")),
        4: _frame(0.5, num_examples=0),
        5: _frame(0.5) + b"\x00",
        6: _frame(0.5) + b"\x00" * 10_000_000,  # a frame claiming L=4 with 10 MB behind it
    }
    updates, rejected = FedAvg().decode(answers, "coefficients", LAMBDA, wire.decode_coefficients)
    assert [(u.client_id, u.num_examples, round(u.loss, 4)) for u in updates] == [(0, 5, 0.7)]
    assert "loss nan" in rejected[1] and "loss inf" in rejected[2]
    assert "compute cpu_s nan" in rejected[3] and "num_examples 0" in rejected[4]
    assert "L=4 needs exactly 88" in rejected[5]
    assert "sent 10000088 bytes; this upload is at most" in rejected[6]  # refused by size before parsing
    assert struct.calcsize("<4sBBHIfff") == wire.FRAME_HEADER.size


def test_masked_answers_carry_only_a_count_and_are_bounded_too():
    strategy = SecureFedAvg(transport=None, selection=ClientSelection(min_clients=2))
    answers = {
        0: wire.encode({}, num_examples=4),
        1: wire.encode({}, num_examples=float("inf")),
        2: wire.encode({"vectors": _vectors(2)}, num_examples=4),  # the value in the clear: not asked for, too big
    }
    updates, rejected = strategy.decode(answers, "vectors", SHAPE)
    assert [u.client_id for u in updates] == [0]
    assert "num_examples inf" in rejected[1] and "at most" in rejected[2]


# ------------------------------------------------------------------------------------- secure aggregation
class GarbageCohort:
    """In-process masking clients (real keys, shares and masking); ``garbage`` upload random ring elements
    (well-formed, so only the sum can tell), ``wrong_type`` a float64 array in place of the masked one."""

    session = "in-process"

    def __init__(
        self, values: dict[int, np.ndarray], garbage: set[int] = frozenset(), wrong_type: set[int] = frozenset()
    ):
        self.values, self.garbage, self.wrong_type = values, set(garbage), set(wrong_type)
        self.maskers: dict[int, MaskingClient] = {}
        self.excluded: set[int] = set()

    def call(self, stage, round_index, method, requests):
        if method == "secagg_keys":
            self.maskers = {cid: MaskingClient(cid, self.values[cid]) for cid in requests}
        answers = {cid: getattr(self.maskers[cid], method)(request) for cid, request in requests.items()}
        for cid in answers if method == "secagg_upload" else ():
            arrays, meta = wire.decode(answers[cid])
            masked = arrays["masked"]
            if cid in self.garbage:
                masked = np.random.default_rng(cid).integers(0, 2**64, size=masked.size, dtype=np.uint64)
            if cid in self.wrong_type:
                masked = masked.astype(np.float64)
            answers[cid] = wire.encode({"masked": masked}, **meta)
        return Exchange.of(requests, answers, {})

    def exclude(self, client_id: int) -> None:
        self.excluded.add(client_id)


def _secure_updates(strategy: SecureFedAvg, cohort: GarbageCohort):
    updates, rejected = strategy.decode(
        {cid: wire.encode({}, num_examples=5) for cid in cohort.values}, "coefficients", LAMBDA
    )
    assert rejected == {}
    return updates


@pytest.mark.parametrize("weighted", [False, True])
def test_a_masked_garbage_upload_fails_the_secure_aggregation_instead_of_publishing_an_absurd_mean(weighted):
    rng = np.random.default_rng(0)
    values = {cid: rng.normal(size=LAMBDA) * (5 if weighted else 1) for cid in range(3)}
    honest = SecureFedAvg(GarbageCohort(values), weighted=weighted, selection=ClientSelection(min_clients=2))
    result = honest.aggregate(RoundId("calibrate", 1, "round 1"), _secure_updates(honest, honest.transport))
    expected = sum(values.values()) / (15 if weighted else 3)
    np.testing.assert_allclose(result.value, expected, atol=1e-5)  # the bound leaves honest sums alone

    cohort = GarbageCohort(values, garbage={1})
    strategy = SecureFedAvg(cohort, weighted=weighted, selection=ClientSelection(min_clients=2))
    with pytest.raises(FederationError, match=r"securely aggregated sum reaches .* beyond the .* cohort of 3"):
        strategy.aggregate(RoundId("calibrate", 1, "round 1"), _secure_updates(strategy, cohort))


def test_a_masked_upload_of_the_wrong_type_is_rejected_and_its_masks_removed_without_it():
    """Before, a float64 masked upload raised inside the sum and failed the whole aggregation."""
    rng = np.random.default_rng(1)
    values = {cid: rng.normal(size=LAMBDA) for cid in range(3)}
    cohort = GarbageCohort(values, wrong_type={2})
    strategy = SecureFedAvg(cohort, selection=ClientSelection(min_clients=2))
    result = strategy.aggregate(RoundId("calibrate", 1, "round 1"), _secure_updates(strategy, cohort))
    np.testing.assert_allclose(result.value, (values[0] + values[1]) / 2, atol=1e-5)
    assert [u.client_id for u in result.used] == [0, 1] and cohort.excluded == {2}
    assert "masked upload of float64[16], expected uint64[16]" in result.dropped[2]


def test_upload_facts_accepts_what_honest_clients_send():
    meta = json.loads(json.dumps({"num_examples": 12, "loss": 0.25, "compute": {"cpu_s": 0.1, "wall_s": 0.2}}))
    assert wire.upload_facts(meta, 0) == (12, 0.25)
    assert wire.upload_facts({"num_examples": 1}, 0) == (1, None)
    assert wire.decode_coefficients(wire.encode_coefficients(np.ones(LAMBDA), 7, loss=1.5))[1]["loss"] == 1.5


def test_lora_adapter_uploads_are_checked_for_size_dtype_and_facts():
    """FedAvg-LoRA's own decode of adapter states (named tensors in the global state's names and shapes)."""
    from ifedicl.federation_job.lora_federation import LoraFederation

    like = {"a.lora_A.weight": np.zeros((8, 16), np.float32), "a.lora_B.weight": np.zeros((16, 8), np.float32)}
    ok = {name: np.full(v.shape, 0.01, np.float32) for name, v in like.items()}
    answers = {
        0: wire.encode(ok, num_examples=6, loss=0.5),
        1: wire.encode({n: v.astype(np.float64) for n, v in ok.items()}, num_examples=6),  # was accepted
        2: wire.encode(ok, num_examples=6, loss="x"),  # was accepted
        3: wire.encode(ok, num_examples=6, padding="x" * 100_000),  # was decoded and accepted
    }
    updates, rejected = LoraFederation._decode_states(None, answers, like)  # uses nothing of the run
    assert [(u.client_id, u.num_examples, u.loss) for u in updates] == [(0, 6, 0.5)]
    assert "another dtype" in rejected[1] and "loss 'x'" in rejected[2] and "at most" in rejected[3]


# ------------------------------------------------------------------------------------- one real federation
def test_bad_uploads_in_a_real_federation_are_rejected_and_the_run_completes(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Real Ray, the tiny Llama: client 1 claims 1e400 examples (before: an uncaught OverflowError aborted
    the run), client 2 pads its upload past what the request needs; both are recorded rejections of
    stage 1, the two honest clients carry the run to completion and it is published."""
    from ifedicl.federation_job.driver import Federation, FederationSettings
    from ifedicl.kernel.sources import DataSource
    from ifedicl.storage.store import Store

    settings = FederationSettings(
        clients=4, alpha=100.0, rounds=1, min_clients=2, round_timeout_s=120, min_shard=4,
        adversaries={1: "count:1e400", 2: "pad:200000"},
    )  # fmt: skip
    source = DataSource(str(task_dir), max_train=40, max_test=0)
    result = Federation(str(llama_dir), source, str(tmp_path / "store"), settings).run(publish=True)
    stage_one = result.rounds[0]
    assert stage_one.clients_answered == [0, 3]
    assert "rejected update: client 1 reported num_examples inf" in stage_one.dropped[1]
    assert "rejected update: client 2 sent" in stage_one.dropped[2] and "this upload is at most" in stage_one.dropped[2]
    assert result.rounds[1].clients_answered == [0, 3]
    store = Store(tmp_path / "store")
    assert store.run_row(result.run_id)["status"] == "complete"
    assert store.published_run_id(source.load().task.name) == result.run_id
