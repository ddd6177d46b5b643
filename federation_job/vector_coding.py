"""How a client's stage-1 context vectors v_k travel: float32, float16 or int8 on the wire.

Why: stage 1 is the run's biggest message by far. v_k is ``[L, 2, d]`` float32, 138 KB per
client for SmolLM2-135M (L=30, d=576), against ~0.5 KB per round of Λ. Halving it (float16)
or quartering it (int8) is the cheapest communication saving the method has. The client codes
its upload *after* any DP noise (the noise is part of the value, coding is transport); the
server decodes back to float32 before anything else looks at it, so strategies, the norm
screen, robust rules and the stored vectors all see float32. Secure aggregation masks float
values in a fixed-point ring and is not combined with a coding (the settings refuse it).

int8 is symmetric with one scale per (layer, block) row: ``scale = max|v| / 127`` over the
row's ``d`` values, ``q = round(v / scale)`` in [-127, 127], decoded ``q * scale``; the error
is at most ``scale / 2`` per element. A row of zeros has scale 0 and decodes to zeros.
float16 refuses values beyond its range (they would silently become inf).

int8 is the default (``default_coding``): in ``docs/ablation`` it scored what float32 scored on
Subj (two seeds) and one test text of 200 less on Emotion, at a quarter of the bytes (the issue's
bar: the smallest coding that loses under 0.5 point). Under secure aggregation the default is float32.

The arrays are named tensors in the usual safetensors payload (:mod:`~ifedicl.federation_job.wire`):
``vectors`` (float32 / float16 / int8 ``[L, 2, d]``) and, for int8, ``scale`` (float32 ``[L, 2]``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ifedicl.federation_job import wire
from ifedicl.kernel.errors import FederationError

CODINGS = ("float32", "float16", "int8")
DEFAULT_CODING = "int8"
INT8_MAX = 127
_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def default_coding(secagg: bool) -> str:
    """The stage-1 coding when none is asked for: int8, or float32 under secure aggregation (its masked
    sums are fixed point over float values, so a coding does not apply)."""
    return "float32" if secagg else DEFAULT_CODING


def _known(coding: str) -> None:
    if coding not in CODINGS:
        raise FederationError(f"unknown vector coding {coding!r} (choose from {', '.join(CODINGS)})")


def encode_vectors(vectors: np.ndarray, coding: str) -> dict[str, np.ndarray]:
    """Client side: v [..., d] float32 -> the named arrays to upload in ``coding``."""
    _known(coding)
    v = np.asarray(vectors, dtype=np.float32)  # [L, 2, d]
    if coding == "float32":
        return {"vectors": v}
    if coding == "float16":
        with np.errstate(over="ignore"):
            half = v.astype(np.float16)  # [L, 2, d]
        overflow = np.isinf(half) & np.isfinite(v)
        if overflow.any():
            value = float(v[overflow].flat[0])
            raise FederationError(f"vector value {value:g} overflows float16; use --vector-coding float32 or int8")
        return {"vectors": half}
    with np.errstate(invalid="ignore"):  # a non-finite row gets a non-finite scale: the server rejects it
        scale = (np.max(np.abs(v), axis=-1) / INT8_MAX).astype(np.float32)  # [L, 2]
        safe = np.where(scale > 0, scale, 1.0)[..., None]  # [L, 2, 1]; zero rows: q = 0
        ratio = np.nan_to_num(v / safe, nan=0.0, posinf=INT8_MAX, neginf=-INT8_MAX)
    q = np.clip(np.rint(ratio), -INT8_MAX, INT8_MAX).astype(np.int8)  # [L, 2, d]
    return {"vectors": q, "scale": scale}


def decode_vectors(arrays: dict[str, np.ndarray], coding: str) -> np.ndarray:
    """Server side: an upload's named arrays in ``coding`` -> v float32 [L, 2, d]; malformed: FederationError."""
    _known(coding)
    expected = {"vectors", "scale"} if coding == "int8" else {"vectors"}
    if set(arrays) != expected:
        raise FederationError(f"a {coding} vector upload carries {sorted(expected)}, got {sorted(arrays)}")
    values = arrays["vectors"]
    if values.dtype != _DTYPES[coding]:
        raise FederationError(f"vectors arrived as {values.dtype}, expected {coding} (--vector-coding {coding})")
    if coding != "int8":
        return values.astype(np.float32)
    scale = arrays["scale"]  # [L, 2]
    if values.ndim < 1 or scale.shape != values.shape[:-1]:
        raise FederationError(f"int8 scale has shape {scale.shape}, expected {values.shape[:-1]}")
    if scale.dtype != np.float32:
        raise FederationError(f"int8 scale arrived as {scale.dtype}, expected float32")
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise FederationError("int8 scale is not finite and non-negative")
    if values.size and int(values.min()) < -INT8_MAX:
        raise FederationError(f"int8 vectors hold {int(values.min())}, outside [-127, 127]")
    return values.astype(np.float32) * scale[..., None]  # [L, 2, d]


def upload_reader(coding: str) -> Callable[[bytes, int], tuple[np.ndarray, dict]]:
    """The server's reader of stage-1 uploads in ``coding`` (for a strategy's ``decode``): -> (v float32, meta)."""
    _known(coding)

    def read(payload: bytes, client_id: int) -> tuple[np.ndarray, dict]:
        arrays, meta = wire.decode(payload)
        try:
            return decode_vectors(arrays, coding), meta
        except FederationError as err:
            raise FederationError(f"client {client_id}: {err}") from None

    return read
