"""What crosses the Ray boundary between clients and the server, as bytes.

Clients and the driver exchange *only* these byte strings (safetensors: a JSON
header and raw little-endian arrays; no pickle, so a malicious payload cannot
run code on the server). Because the payload is a ``bytes`` object, ``len()`` of
it is exactly what was sent; the communication accounting counts that.
"""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load, save

from ifedicl.kernel.errors import FederationError


def encode(arrays: dict[str, np.ndarray], **meta: object) -> bytes:
    """Arrays plus small JSON metadata (round, settings, counts) in one payload."""
    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"meta": json.dumps(meta)})


def decode(payload: bytes) -> tuple[dict[str, np.ndarray], dict]:
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
    try:
        header_len = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    except Exception:
        return {}
    return meta if isinstance(meta, dict) else {}
