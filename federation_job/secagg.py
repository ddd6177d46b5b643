"""Secure aggregation by pairwise additive masks (Bonawitz et al. 2017, without Shamir shares).

Why: with it the server learns only the *sum* of the cohort's vectors or Λ, never one
client's value. Each attempt, every client makes a fresh X25519 key pair; the server
relays the public keys; each pair (i, j) derives the same secret, expands it with
ChaCha20 into a mask, and i adds it while j subtracts it. Values are fixed-point
integers in the ring Z/2^64 (numpy uint64 wraps), so the masks cancel *exactly* in
the sum and nothing is left of them.

Dropouts: a client that dies after the keys are agreed leaves its pairwise masks
uncancelled. This implementation does not recover them (that needs Shamir shares of
the mask seeds, as SecAgg+ does); the driver instead redoes the masking with the
survivors and *fresh* keys, reusing the survivors' already computed local results
(no extra training). Fresh keys matter: reused masks would let the server subtract two
uploads of one client and strip a mask.

Threat model: an honest-but-curious server (it follows the protocol, keys relayed
unchanged). A server that swaps public keys can unmask; signing the ephemeral keys
with each organisation's long-term key (a PKI) closes that and is not done here.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ifedicl.kernel.errors import FederationError

FRACTION_BITS = 24  # fixed point: x -> round(x * 2^24); resolution 6e-8, range +-5.5e11 per value
MIN_COHORT = 2  # a client refuses to mask for a cohort smaller than this (a sum of one is the value)


def encode_fixed(values: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """float -> uint64 ring element (two's complement). [...] -> [...] uint64."""
    scaled = np.rint(values.astype(np.float64) * (1 << fraction_bits))
    limit = float(1 << 62)
    if not np.all(np.isfinite(scaled)) or np.any(np.abs(scaled) >= limit):
        raise FederationError("secure aggregation: value not finite or outside the fixed-point range")
    return scaled.astype(np.int64).view(np.uint64)


def decode_fixed(ring: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """uint64 ring element -> float64 (two's complement back to signed)."""
    return ring.view(np.int64).astype(np.float64) / (1 << fraction_bits)


def _mask(shared_secret: bytes, context: bytes, size: int) -> np.ndarray:
    """The pair's mask: HKDF(secret, context) -> ChaCha20 keystream -> ``size`` uint64."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ifedicl-secagg|" + context).derive(shared_secret)
    stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor().update(b"\x00" * (8 * size))
    return np.frombuffer(stream, dtype=np.uint64)


class MaskingClient:
    """A client's side of one masking attempt: a fresh key pair, then one masked upload."""

    def __init__(self, client_id: int):
        self.client_id = client_id
        self._key = X25519PrivateKey.generate()

    def public_key(self) -> np.ndarray:
        """32 bytes as uint8[32], to send through the server."""
        return np.frombuffer(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), dtype=np.uint8)

    def mask(self, values: np.ndarray, peers: dict[int, np.ndarray], context: bytes) -> np.ndarray:
        """Fixed-point ``values`` plus the masks shared with every other cohort member. -> uint64[size]."""
        if self.client_id not in peers:
            raise FederationError(f"client {self.client_id} is not in the masking cohort")
        if len(peers) < MIN_COHORT:
            raise FederationError(f"refusing to mask for a cohort of {len(peers)} (< {MIN_COHORT})")
        if not np.array_equal(np.asarray(peers[self.client_id], np.uint8).reshape(-1), self.public_key()):
            raise FederationError(f"client {self.client_id}: the relayed key list does not carry its own key")
        if len({bytes(np.asarray(k, np.uint8)) for k in peers.values()}) != len(peers):
            raise FederationError(f"client {self.client_id}: duplicate public keys in the cohort")
        out = encode_fixed(values).reshape(-1).copy()  # [size] uint64
        with np.errstate(over="ignore"):
            for peer, key in sorted(peers.items()):
                if peer == self.client_id:
                    continue
                secret = self._key.exchange(X25519PublicKey.from_public_bytes(bytes(np.asarray(key, np.uint8))))
                low, high = sorted((self.client_id, peer))
                mask = _mask(secret, context + f"|{low}|{high}".encode(), out.size)
                out = out + mask if self.client_id < peer else out - mask
        return out


def unmask_sum(uploads: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Server side: the ring sum of every cohort member's upload, decoded. Masks cancel only if all are here."""
    total = np.zeros(int(np.prod(shape)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for upload in uploads:
            if upload.dtype != np.uint64 or upload.size != total.size:
                raise FederationError(f"masked upload of {upload.dtype}[{upload.size}], expected uint64[{total.size}]")
            total = total + upload
    return decode_fixed(total).reshape(shape)
