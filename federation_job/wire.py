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

Every upload is untrusted input (issue 31): a client can send any bytes. So a payload's size is
checked against what the request legitimately needs *before* anything parses it
(:func:`upload_limit`, the ``limit`` of :func:`decode`), and the facts it reports about itself
(example count, loss, compute seconds) are checked for type and range (:func:`upload_facts`)
before the server uses them. Every failure is a :class:`FederationError` naming the client, which
the strategies record as that client's rejection; the round goes on with the others.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
from safetensors.numpy import load, save

from ifedicl.federation_job import compute as client_compute
from ifedicl.kernel.errors import FederationError

# ------------------------------------------------------------------------------------ upload bounds
# What an honest upload's header needs: safetensors' 8-byte length, then a JSON header naming each
# tensor (name, dtype, shape, offsets: ~100 B) and the small metadata (num_examples, loss, compute:
# ~130 B). Measured ~230 B for a stage-1 upload; the allowance is generous so no honest client is refused.
HEADER_BYTES = 2048
TENSOR_HEADER_BYTES = 512  # per named tensor (LoRA state names run to ~80 characters)
# The largest example count any upload may claim: the Λ frame's u32 field, so the two kinds agree.
MAX_EXAMPLES = 0xFFFFFFFF
# A client's mean local loss is a cross-entropy: finite, >= 0, and for any vocabulary far below this.
MAX_LOSS = 1e6
# meta_of reads a header without a size from the request at hand: this bounds its JSON parse.
MAX_META_HEADER_BYTES = 1 << 20


def upload_limit(elements: int, tensors: int = 1, itemsize: int = 4) -> int:
    """The most bytes an honest upload of ``elements`` values (``itemsize`` bytes each, float32 by default)
    in ``tensors`` named tensors can take, header included. E.g. stage-1 vectors [L, 2, d]: 4·2Ld + header
    (an int8 upload with its [L, 2] scales is smaller); a masked upload: 8 B per element (uint64)."""
    return HEADER_BYTES + tensors * TENSOR_HEADER_BYTES + itemsize * int(elements)


def check_size(payload: object, limit: int, client_id: int | None = None) -> bytes:
    """``payload`` if it is ``bytes`` of at most ``limit`` bytes, else FederationError: checked before decoding."""
    who = "a client" if client_id is None else f"client {client_id}"
    if not isinstance(payload, bytes):
        raise FederationError(f"{who} answered {type(payload).__name__}, not a bytes payload")
    if len(payload) > limit:
        raise FederationError(f"{who} sent {len(payload)} bytes; this upload is at most {limit} bytes")
    return payload


def upload_facts(meta: object, client_id: int | None = None) -> tuple[int, float | None]:
    """An upload's reported facts, checked -> (num_examples, loss or None); malformed: FederationError.

    ``num_examples`` must be an integer in [1, MAX_EXAMPLES] (JSON's 1e400 reads as inf, 3.0 as a
    float, true as a bool: all refused); ``loss``, if present, a finite number in [0, MAX_LOSS]; a
    ``compute`` report, if present, finite non-negative seconds (:func:`compute.parse`).
    """
    who = "a client" if client_id is None else f"client {client_id}"
    if not isinstance(meta, dict):
        raise FederationError(f"{who} sent metadata that is not an object ({type(meta).__name__})")
    if "num_examples" not in meta:
        raise FederationError(f"{who} reported no num_examples")
    count = meta["num_examples"]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EXAMPLES:
        raise FederationError(f"{who} reported num_examples {_show(count)}; expected an integer in 1..{MAX_EXAMPLES}")
    loss = meta.get("loss")
    if loss is not None:
        value = client_compute.finite_number(loss)
        if value is None or not 0 <= value <= MAX_LOSS:
            raise FederationError(f"{who} reported loss {_show(loss)}; expected a finite number in [0, {MAX_LOSS:g}]")
        loss = value
    if "compute" in meta:
        try:
            client_compute.parse(meta["compute"])
        except ValueError as err:
            raise FederationError(f"{who} reported {err}") from None
    return count, loss


def holdout_facts(meta: dict, client_id: int | None = None) -> tuple[int, float] | None:
    """An upload's held-out report (early stopping), checked -> (held-out examples, loss), or None if absent."""
    if "holdout_loss" not in meta and "holdout_examples" not in meta:
        return None
    who = "a client" if client_id is None else f"client {client_id}"
    count, loss = meta.get("holdout_examples"), client_compute.finite_number(meta.get("holdout_loss"))
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EXAMPLES:
        expected = f"expected an integer in 1..{MAX_EXAMPLES}"
        raise FederationError(f"{who} reported holdout_examples {_show(count)}; {expected}")
    if loss is None or not 0 <= loss <= MAX_LOSS:
        shown = _show(meta.get("holdout_loss"))
        raise FederationError(f"{who} reported holdout_loss {shown}; expected a finite number in [0, {MAX_LOSS:g}]")
    return count, loss


def _show(value: object) -> str:
    """A reported value for an error message, never longer than a line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def encode(arrays: dict[str, np.ndarray], **meta: object) -> bytes:
    """Arrays plus small JSON metadata (round, settings, counts) in one payload."""
    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"meta": json.dumps(meta)})


def decode(payload: bytes, limit: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Any payload -> (named arrays, metadata); a Λ frame reads as ``{"coefficients": Λ}`` and its facts.

    ``limit``: refuse a payload over this many bytes before parsing anything (an upload's
    :func:`upload_limit`). The metadata is always a JSON object (``{}`` when absent).
    """
    if not isinstance(payload, bytes):
        raise FederationError(f"undecodable update: {type(payload).__name__}, not a bytes payload")
    if limit is not None:
        check_size(payload, limit)
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
    if not isinstance(meta, dict):
        raise FederationError(f"undecodable update: its metadata is a {type(meta).__name__}, not an object")
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
        if header_len > MAX_META_HEADER_BYTES:
            return {}
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
