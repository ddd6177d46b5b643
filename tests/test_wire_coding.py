"""What crosses the wire, compactly: stage-1 vectors coded (float32 | float16 | int8), Λ as a fixed frame.

Real encoders and decoders, the real strategy decode, a real client actor in process (tiny model).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ifedicl.federation_job import wire
from ifedicl.federation_job.federation_settings import FederationSettings
from ifedicl.federation_job.strategies import FedAvg
from ifedicl.federation_job.vector_coding import CODINGS, decode_vectors, encode_vectors, upload_reader
from ifedicl.kernel.errors import FederationError, IfediclError
from ifedicl.kernel.sources import DataSource

L, D = 30, 576  # SmolLM2-135M's shape


def _vectors(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(L, 2, D)) * rng.uniform(0.01, 50, size=(L, 2, 1))).astype(np.float32)  # [L, 2, d]


# ------------------------------------------------------------------------------------------ vector coding
def test_each_coding_round_trips_within_its_error_bound():
    v = _vectors()
    sizes = {}
    for coding in CODINGS:
        arrays = encode_vectors(v, coding)
        back = decode_vectors(wire.decode(wire.encode(arrays, num_examples=3))[0], coding)
        assert back.dtype == np.float32 and back.shape == v.shape
        sizes[coding] = sum(a.nbytes for a in arrays.values())
        if coding == "float32":
            assert np.array_equal(back, v)
        elif coding == "float16":
            assert np.all(np.abs(back - v) <= 1e-3 * np.abs(v) + 1e-7)  # 11-bit mantissa: rel err <= 2^-11
        else:
            scale = arrays["scale"]
            assert arrays["vectors"].dtype == np.int8 and scale.shape == (L, 2) and scale.dtype == np.float32
            assert np.all(np.abs(back - v) <= scale[..., None] / 2 * (1 + 1e-5))
            assert np.all(np.abs(arrays["vectors"]).max(axis=-1) == 127)  # each row's largest value uses the range
    assert sizes == {"float32": 4 * L * 2 * D, "float16": 2 * L * 2 * D, "int8": L * 2 * D + 4 * L * 2}


def test_zero_rows_decode_to_zeros_without_division_by_zero():
    v = _vectors()
    v[3, 1] = 0.0
    v[0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero / invalid-cast warnings
        arrays = encode_vectors(v, "int8")
        back = decode_vectors(arrays, "int8")
    assert arrays["scale"][3, 1] == 0 and arrays["scale"][0].tolist() == [0, 0]
    assert np.all(back[3, 1] == 0) and np.all(back[0] == 0) and np.all(np.isfinite(back))
    assert np.all(decode_vectors(encode_vectors(np.zeros((2, 2, 8), np.float32), "int8"), "int8") == 0)


def test_float16_overflow_is_a_clear_client_error():
    v = _vectors()
    v[5, 0, 7] = 1e6
    with pytest.raises(FederationError, match=r"vector value 1e\+06 overflows float16; use --vector-coding float32"):
        encode_vectors(v, "float16")
    v[5, 0, 7] = 65504.0  # float16's largest finite value still fits
    assert np.isfinite(decode_vectors(encode_vectors(v, "float16"), "float16")).all()


def _int8(**replace) -> dict[str, np.ndarray]:
    arrays = encode_vectors(_vectors(), "int8")
    arrays.update(replace)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize(
    ("coding", "arrays", "match"),
    [
        ("int8", {"vectors": encode_vectors(_vectors(), "float32")["vectors"]}, r"carries \['scale', 'vectors'\]"),
        ("int8", _int8(vectors=np.zeros((L, 2, D), np.int16)), "arrived as int16, expected int8"),
        ("int8", _int8(scale=None), "carries"),  # missing scale
        ("int8", _int8(scale=np.ones((L, 1), np.float32)), r"scale has shape \(30, 1\), expected \(30, 2\)"),
        ("int8", _int8(scale=np.ones((L, 2), np.float64)), "scale arrived as float64"),
        ("int8", _int8(scale=np.full((L, 2), np.nan, np.float32)), "not finite"),
        ("int8", _int8(scale=np.full((L, 2), -1.0, np.float32)), "non-negative"),
        ("int8", _int8(vectors=np.full((L, 2, D), -128, np.int8)), r"outside \[-127, 127\]"),
        ("float16", encode_vectors(_vectors(), "float32"), "arrived as float32, expected float16"),
        ("float32", encode_vectors(_vectors(), "float16"), "arrived as float16, expected float32"),
        ("float32", {**encode_vectors(_vectors(), "float32"), "scale": np.ones((L, 2), np.float32)}, "carries"),
        ("bfloat8", encode_vectors(_vectors(), "float32"), "unknown vector coding 'bfloat8'"),
    ],
)
def test_malformed_coded_uploads_are_rejected(coding, arrays, match):
    with pytest.raises(FederationError, match=match):
        decode_vectors(arrays, coding)


def test_the_server_records_a_malformed_coded_upload_as_a_rejection_naming_the_client():
    good = wire.encode(encode_vectors(_vectors(), "int8"), num_examples=4)
    no_scale = wire.encode({"vectors": encode_vectors(_vectors(), "int8")["vectors"]}, num_examples=4)
    nan_scale = wire.encode(_int8(scale=np.full((L, 2), np.inf, np.float32)), num_examples=4)
    answers = {0: good, 1: no_scale, 2: nan_scale}
    updates, rejected = FedAvg().decode(answers, "vectors", (L, 2, D), upload_reader("int8"))
    assert [u.client_id for u in updates] == [0] and updates[0].values.dtype == np.float32
    assert rejected[1].startswith("rejected update: client 1:") and "scale" in rejected[1]
    assert "client 2" in rejected[2] and "not finite" in rejected[2]


def test_settings_validate_the_coding_and_refuse_it_under_secure_aggregation():
    FederationSettings(vector_coding="int8").validate()
    with pytest.raises(IfediclError, match="--vector-coding must be one of float32, float16, int8"):
        FederationSettings(vector_coding="int4").validate()
    with pytest.raises(IfediclError, match="--vector-coding only applies without --secagg"):
        FederationSettings(clients=4, min_clients=3, secagg=True, vector_coding="float16").validate()
    assert FederationSettings().vector_coding == "int8"  # the default
    under_secagg = FederationSettings(clients=4, min_clients=3, secagg=True)
    under_secagg.validate()
    assert under_secagg.vector_coding == "float32"  # the default under secure aggregation


def test_the_coding_is_part_of_an_evaluation_cell():
    from ifedicl.evaluation.settings import EvalSettings
    from ifedicl.federation_job.options import FederationOptions

    changed = FederationOptions(vector_coding="float32").changed()
    assert changed == {"vector_coding": "float32"}
    assert FederationOptions().settings(0.5, 0).vector_coding == "int8"
    base = EvalSettings("m", ["t"])  # the default coding, int8
    assert EvalSettings("m", ["t"], federation={"vector_coding": "int8"}).cell_hash() == base.cell_hash()
    as_before = EvalSettings("m", ["t"], federation=changed)
    assert as_before.cell_hash() != base.cell_hash()  # a float32 cell is not an int8 one...
    assert as_before.federation_for_hash("fedavg_lora") == {}  # ...hashes as the cells before int8
    assert EvalSettings("m", ["t"], federation={"secagg": True}).federation_for_hash("fedavg_lora") == {"secagg": True}
    assert EvalSettings("m", ["t"], federation=FederationOptions().changed()).cell_hash() == base.cell_hash()


# ------------------------------------------------------------------------------------------ the Λ frame
def test_the_coefficient_frame_round_trips_at_its_exact_size():
    coefficients = np.random.default_rng(1).normal(size=(L, 2, 2)).astype(np.float32)
    frame = wire.encode_coefficients(coefficients, 123, 0.6931, {"cpu_s": 12.3456, "wall_s": 30.5})
    framing = len(frame) - 4 * L * 4
    assert len(frame) == wire.frame_size(L) == 4 * L * 4 + framing and framing == 24 <= 64
    values, meta = wire.decode_coefficients(frame)
    assert np.array_equal(values, coefficients) and values.dtype == np.float32 and values.flags.writeable
    assert meta["num_examples"] == 123 and meta["compute"] == {"cpu_s": 12.3456, "wall_s": 30.5}
    assert meta["loss"] == pytest.approx(0.6931, rel=1e-6)
    # every reader of answers understands it: the generic decode, the compute report's reader
    arrays, same = wire.decode(frame)
    assert np.array_equal(arrays["coefficients"], coefficients) and same == meta
    assert wire.meta_of(frame) == meta
    old = wire.encode({"coefficients": coefficients}, num_examples=123, loss=0.6931, compute=meta["compute"])
    assert len(old) - len(frame) > 150  # what the safetensors header and JSON meta cost
    bare = wire.decode_coefficients(wire.encode_coefficients(coefficients[:2], 5))[1]
    assert bare == {"num_examples": 5}  # no loss, no compute report: absent, not zeros


def test_the_coefficient_frame_is_parsed_strictly():
    frame = wire.encode_coefficients(np.ones((4, 2, 2), np.float32), 7, 0.5, {"cpu_s": 1.0, "wall_s": 2.0})
    bad = {
        "shorter than its L": frame[:-1],
        "longer than its L": frame + b"\0",
        "header cut": frame[:10],
        "magic": b"XXXX" + frame[4:],
        "version": frame[:4] + bytes([2]) + frame[5:],
        "flags": frame[:5] + bytes([0x80]) + frame[6:],
        "L = 0": frame[:6] + (0).to_bytes(2, "little") + frame[8:],
        "safetensors": wire.encode({"coefficients": np.ones((4, 2, 2), np.float32)}, num_examples=7),
    }
    messages = {}
    for what, payload in bad.items():
        with pytest.raises(FederationError, match="client 3") as err:
            wire.decode_coefficients(payload, client_id=3)
        messages[what] = str(err.value)
    assert "L=4 needs exactly 88" in messages["shorter than its L"] and "89 bytes" in messages["longer than its L"]
    assert "magic b'XXXX'" in messages["magic"] and "version 2" in messages["version"]
    assert "unknown flags" in messages["flags"] and "no Λ frame" in messages["safetensors"]
    assert wire.meta_of(frame[:-1]) == {}  # a broken frame has no compute report
    with pytest.raises(FederationError, match=r"\[L, 2, 2\]"):
        wire.encode_coefficients(np.ones((4, 2, 3), np.float32), 7)
    with pytest.raises(FederationError, match="compute"):
        wire.encode_coefficients(np.ones((4, 2, 2), np.float32), 7, compute={"cpu_s": 1.0, "gpu_s": 2.0})


def test_the_server_reads_frames_and_rejects_anything_else_for_lambda():
    good = wire.encode_coefficients(np.ones((2, 2, 2), np.float32), 3, 0.5)
    nan = wire.encode_coefficients(np.full((2, 2, 2), np.nan, np.float32), 3)
    wrong_l = wire.encode_coefficients(np.ones((3, 2, 2), np.float32), 3)
    tensors = wire.encode({"coefficients": np.ones((2, 2, 2), np.float32)}, num_examples=3)
    answers = {0: good, 1: b"garbage", 2: nan, 3: wrong_l, 4: tensors}
    updates, rejected = FedAvg().decode(answers, "coefficients", (2, 2, 2), wire.decode_coefficients)
    assert [(u.client_id, u.num_examples, u.loss) for u in updates] == [(0, 3, 0.5)]
    assert "client 1 sent no Λ frame" in rejected[1] and "non-finite" in rejected[2]
    assert "shape (3, 2, 2)" in rejected[3] and "client 4 sent no Λ frame" in rejected[4]


# ------------------------------------------------------------------------------------------ a real client
def test_a_client_actor_codes_its_vector_upload_and_frames_its_lambda(llama_dir, task_dir):
    from hosting import hosted_client

    actor = hosted_client(llama_dir, DataSource(str(task_dir)), list(range(12)))
    plain = actor.extract(wire.encode({}, batch_size=8))
    coded = actor.extract(wire.encode({}, batch_size=8, vector_coding="int8"))
    v = upload_reader("float32")(plain, 0)[0]
    arrays, meta = wire.decode(coded)
    back, same = upload_reader("int8")(coded, 0)
    assert (
        arrays["vectors"].dtype == np.int8
        and same["num_examples"] == 12
        and set(same["compute"])
        == {
            "cpu_s",
            "wall_s",
        }
    )
    assert np.all(np.abs(back - v) <= arrays["scale"][..., None] / 2 * (1 + 1e-5))
    layers = v.shape[0]
    assert len(plain) - len(coded) > 3 * v.size - 4 * 2 * layers - 64  # 4 bytes -> 1 per value, plus the scales
    actor.set_global_vectors(wire.encode({"vectors": back}))
    start = np.ones((layers, 2, 2), np.float32)
    answer = actor.calibrate(wire.encode({"coefficients": start}, config={"epochs": 1, "batch_size": 4}, seed=1))
    assert len(answer) == wire.frame_size(layers) == 16 * layers + 24
    coefficients, facts = wire.decode_coefficients(answer, 0)
    assert coefficients.shape == (layers, 2, 2) and np.isfinite(facts["loss"]) and facts["num_examples"] == 12
    with pytest.raises(FederationError, match="overflows float16"):
        actor._answer("vectors", np.full((layers, 2, 4), 1e9, np.float32), {"vector_coding": "float16"})
