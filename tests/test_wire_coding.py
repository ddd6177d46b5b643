"""What crosses the wire, compactly: Λ as a fixed binary frame.

Real encoders and decoders, the real strategy decode.
"""

from __future__ import annotations

import numpy as np
import pytest

from ifedicl.federation_job import wire
from ifedicl.federation_job.strategies import FedAvg
from ifedicl.kernel.errors import FederationError

L = 30  # SmolLM2-135M's layers


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
