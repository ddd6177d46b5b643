"""What crosses the Ray boundary between clients and the server, as bytes.

Clients and the driver exchange *only* these byte strings (safetensors: a JSON
header and raw little-endian arrays; no pickle, so a malicious payload cannot
run code on the server). Because the payload is a ``bytes`` object, ``len()`` of
it is exactly what was sent; the communication accounting counts that.

One message has its own fixed binary frame: a client's per-round Λ upload
(:func:`encode_coefficients`). It is the message sent most often and the smallest, so the
safetensors header and JSON metadata (~216 B) were a third of it; the frame carries the same
facts (example count, local loss, the client's CPU and wall seconds) in 24 B. :func:`decode`
and :func:`meta_of` read both kinds: a frame starts with :data:`FRAME_MAGIC`, which as a
safetensors header length would be over 1 GB, so the two cannot be confused.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
from safetensors.numpy import load, save

from ifedicl.kernel.errors import FederationError


def encode(arrays: dict[str, np.ndarray], **meta: object) -> bytes:
    """Arrays plus small JSON metadata (round, settings, counts) in one payload."""
    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"meta": json.dumps(meta)})


def decode(payload: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """Any payload -> (named arrays, metadata); a Λ frame reads as ``{"coefficients": Λ}`` and its facts."""
    if is_frame(payload):
        coefficients, meta = decode_coefficients(payload)
        return {"coefficients": coefficients}, meta
    try:
        arrays = load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    except Exception as err:
        raise FederationError(f"undecodable update ({len(payload)} bytes): {err}") from None
    return arrays, meta


def meta_of(payload: object) -> dict:
    """The JSON metadata of a payload without loading its arrays; {} for anything undecodable."""
    if not isinstance(payload, bytes) or len(payload) < 8:
        return {}
    if is_frame(payload):
        try:
            return decode_coefficients(payload)[1]
        except FederationError:
            return {}
    try:
        header_len = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    except Exception:
        return {}
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------- the Λ frame
# Little-endian: magic (4 s), version (u8), flags (u8: bit 0 loss present, bit 1 compute present),
# L (u16), num_examples (u32), loss (f32), cpu_s (f32), wall_s (f32); then Λ as float32 [L, 2, 2].
FRAME_MAGIC = b"IFLC"  # as a u32 header length: 1.1 GB, beyond safetensors' 100 MB header limit
FRAME_VERSION = 1
FRAME_HEADER = struct.Struct("<4sBBHIfff")  # 24 bytes
_LOSS, _COMPUTE = 1, 2
COMPUTE_KEYS = ("cpu_s", "wall_s")  # what compute.measured() reports, in this order


def is_frame(payload: object) -> bool:
    return isinstance(payload, bytes) and payload[:4] == FRAME_MAGIC


def frame_size(num_layers: int) -> int:
    """Exact bytes of a Λ frame for L layers: the 24-byte header plus 4·L float32 (L x 2 x 2)."""
    return FRAME_HEADER.size + 16 * num_layers


def encode_coefficients(
    coefficients: np.ndarray, num_examples: int, loss: float | None = None, compute: dict | None = None
) -> bytes:
    """A client's Λ upload [L, 2, 2] with its example count, local loss and compute report, as one frame."""
    values = np.asarray(coefficients)
    if values.ndim != 3 or values.shape[1:] != (2, 2) or not 1 <= values.shape[0] <= 0xFFFF:
        raise FederationError(f"a Λ frame carries [L, 2, 2] with 1 <= L <= 65535, not {values.shape}")
    flags = 0
    seconds = (0.0, 0.0)
    if loss is not None:
        flags |= _LOSS
    if compute is not None:
        if sorted(compute) != sorted(COMPUTE_KEYS):
            raise FederationError(f"a Λ frame carries compute {list(COMPUTE_KEYS)}, not {sorted(compute)}")
        flags |= _COMPUTE
        seconds = tuple(float(compute[k]) for k in COMPUTE_KEYS)
    if not 0 <= int(num_examples) <= 0xFFFFFFFF:
        raise FederationError(f"num_examples {num_examples} does not fit a Λ frame")
    header = FRAME_HEADER.pack(
        FRAME_MAGIC, FRAME_VERSION, flags, values.shape[0], int(num_examples),
        float("nan") if loss is None else float(loss), *seconds,
    )  # fmt: skip
    return header + values.astype("<f4").tobytes()


def decode_coefficients(payload: object, client_id: int | None = None) -> tuple[np.ndarray, dict]:
    """A Λ frame -> (Λ float32 [L, 2, 2], {"num_examples", "loss"?, "compute"?}); anything else: FederationError."""
    who = "a client" if client_id is None else f"client {client_id}"
    if not isinstance(payload, bytes) or len(payload) < FRAME_HEADER.size:
        size = len(payload) if isinstance(payload, bytes) else type(payload).__name__
        raise FederationError(f"{who} sent no Λ frame ({size}; a frame is at least {FRAME_HEADER.size} bytes)")
    magic, version, flags, layers, num_examples, loss, cpu, wall = FRAME_HEADER.unpack_from(payload)
    if magic != FRAME_MAGIC:
        raise FederationError(f"{who} sent no Λ frame (magic {magic!r}, expected {FRAME_MAGIC!r})")
    if version != FRAME_VERSION:
        raise FederationError(f"{who} sent Λ frame version {version}; this server reads version {FRAME_VERSION}")
    if flags & ~(_LOSS | _COMPUTE):
        raise FederationError(f"{who} sent a Λ frame with unknown flags {flags:#04x}")
    if layers < 1 or len(payload) != frame_size(layers):
        raise FederationError(
            f"{who} sent a Λ frame of {len(payload)} bytes; L={layers} needs exactly {frame_size(layers)}"
        )
    coefficients = np.frombuffer(payload, "<f4", offset=FRAME_HEADER.size).reshape(layers, 2, 2).astype(np.float32)
    meta: dict = {"num_examples": num_examples}
    if flags & _LOSS:
        meta["loss"] = float(loss)
    if flags & _COMPUTE:
        # measured() rounds to 0.1 ms; float32 keeps that up to ~14 min per request. A non-finite
        # report passes through unrounded and is then ignored like any malformed one (compute.reported)
        meta["compute"] = {k: round(x, 4) if math.isfinite(x) else x for k, x in zip(COMPUTE_KEYS, (cpu, wall))}
    return coefficients, meta
