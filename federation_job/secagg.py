"""Secure aggregation by pairwise additive masks (Bonawitz et al. 2017, without Shamir shares).

Why: with it the server learns only the *sum* of the cohort's vectors or Λ, never one
client's value. Each attempt, every client makes a fresh X25519 key pair; the server
relays the public keys; each pair (i, j) derives the same secret, expands it with
ChaCha20 into a mask, and i adds it while j subtracts it. Values are fixed-point
integers in the ring Z/2^64 (numpy uint64 wraps), so the masks cancel *exactly* in
the sum and nothing is left of them.

Dropouts: a client that dies after the keys are agreed leaves its pairwise masks
uncancelled. This implementation does not recover them (that needs Shamir shares of
the mask seeds, as SecAgg+ does); :class:`SecureFedAvg` instead redoes the masking with the
survivors and *fresh* keys, reusing the survivors' already computed local results
(no extra training). Fresh keys matter: reused masks would let the server subtract two
uploads of one client and strip a mask.

Threat model: an honest-but-curious server (it follows the protocol, keys relayed
unchanged). A server that swaps public keys can unmask; signing the ephemeral keys
with each organisation's long-term key (a PKI) closes that and is not done here.

Bad uploads: the server cannot check one member's value (it never sees it), only the sum. A
masked upload of the wrong type or size is rejected like a lost one (masking redone without it).
A well-formed upload of garbage ring elements leaves the masks uncancelled: the sum decodes to a
finite but absurd value (uniform in +-5.5e11 per coordinate). Every honest member's value is at
most ``MAX_ABS_VALUE`` per coordinate (the check every clear-text update gets; times N_k when
weighted), so a sum beyond the cohort's total of that (:func:`sum_bound`) proves some member
uploaded garbage: the aggregation fails cleanly and nothing is published. Who it was cannot be
told, so the run fails rather than going on without them. A member that stays inside the bound
but shifts the sum is not detected (that needs robust rules, which need updates in the clear).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ifedicl.federation_job import wire
from ifedicl.federation_job.exchange import Exchange, Traffic, log_event
from ifedicl.federation_job.strategies import (
    MAX_ABS_VALUE,
    Aggregate,
    ClientSelection,
    ClientUpdate,
    RoundId,
    Strategy,
)
from ifedicl.kernel.errors import FederationError, IfediclError

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


def sum_bound(members: list[ClientUpdate], weighted: bool, value_bound: float = MAX_ABS_VALUE) -> float:
    """The largest |coordinate| an honest cohort's sum can have: each member uploads values within
    ``value_bound`` (times its N_k when the mean is weighted)."""
    weight = sum(u.num_examples for u in members) if weighted else len(members)
    return float(weight) * value_bound


def check_masked(upload: object, size: int) -> np.ndarray:
    """One member's masked upload: uint64[size] exactly, else FederationError (before it enters the sum)."""
    if not isinstance(upload, np.ndarray) or upload.dtype != np.uint64 or upload.size != size:
        kind = f"{upload.dtype}[{upload.size}]" if isinstance(upload, np.ndarray) else type(upload).__name__
        raise FederationError(f"masked upload of {kind}, expected uint64[{size}]")
    return upload.reshape(-1)


def unmask_sum(uploads: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Server side: the ring sum of every cohort member's upload, decoded. Masks cancel only if all are here."""
    total = np.zeros(int(np.prod(shape)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for upload in uploads:
            if upload.dtype != np.uint64 or upload.size != total.size:
                raise FederationError(f"masked upload of {upload.dtype}[{upload.size}], expected uint64[{total.size}]")
            total = total + upload
    return decode_fixed(total).reshape(shape)


class Transport(Protocol):
    """How the server reaches the cohort during aggregation (the Ray client pool implements it)."""

    session: str  # unique per run: binds every mask to this run

    def call(self, stage: str, round_index: int, method: str, requests: dict[int, bytes]) -> Exchange:
        """Send each client its request; answers, drops (died, timed out) and bytes come back."""

    def exclude(self, client_id: int) -> None:
        """Never ask this client again in this run."""


class SecureFedAvg(Strategy):
    """FedAvg of values the server never sees one by one: clients upload counts, then masked values.

    ``aggregate`` runs the masked-sum protocol over ``transport``: key agreement, then one masked
    upload per member; the masks cancel in the sum, which divided by the cohort's size (or its
    public example count, weighted) is the mean. A member lost after keys were agreed leaves its
    masks in the sum, so the attempt is redone without it, with fresh keys.
    """

    masked = True

    def __init__(
        self,
        transport: Transport,
        weighted: bool = False,
        selection: ClientSelection = ClientSelection(),
        value_bound: float = MAX_ABS_VALUE,
    ):
        super().__init__(selection, weighted)
        self.transport = transport
        self.value_bound = value_bound  # the most |value| per coordinate an honest member uploads (see sum_bound)

    def aggregate(self, at: RoundId, updates: list[ClientUpdate], reference: np.ndarray | None = None) -> Aggregate:
        self.selection.require(len(updates), at.name)
        by_id = {u.client_id: u for u in updates}
        shape = updates[0].values.shape
        cohort = sorted(by_id)
        dropped: dict[int, str] = {}
        traffic = Traffic()
        for attempt in range(len(cohort) + 1):
            self._require_cohort(at, cohort)
            context = f"{self.transport.session}|{at.stage}|{at.index}|{attempt}"
            public, keys = self._agree_keys(at, cohort, context)
            traffic += keys.traffic
            dropped.update(keys.dropped)
            cohort = sorted(public)
            self._require_cohort(at, cohort)
            keyring = np.stack([public[c] for c in cohort])
            request = wire.encode({"public_keys": keyring}, cohort=cohort, context=context)
            masked = self.transport.call(f"{at.stage}-masked", at.index, "secagg_upload", {c: request for c in cohort})
            traffic += masked.traffic
            uploads, lost = {}, dict(masked.dropped)
            size = int(np.prod(shape))
            limit = wire.upload_limit(size, itemsize=8)  # uint64 ring elements
            for cid, payload in masked.answers.items():
                try:
                    uploads[cid] = check_masked(wire.decode(payload, limit)[0]["masked"], size)
                except (IfediclError, KeyError) as err:
                    lost[cid] = f"rejected masked upload: {err}"
            if not lost:
                members = [by_id[c] for c in cohort]
                mean = self._mean(at, [uploads[c] for c in cohort], members, shape)
                return Aggregate(mean, members, dropped, traffic)
            for cid, reason in lost.items():
                self.transport.exclude(cid)
                dropped[cid] = f"{reason} (after masks were agreed: masking redone without it)"
                log_event("secagg_redo", stage=at.stage, round=at.index, client=cid, attempt=attempt)
            cohort = sorted(set(uploads) - set(lost))
        raise FederationError(f"{at.stage} round {at.index}: secure aggregation did not converge")

    def _require_cohort(self, at: RoundId, cohort: list[int]) -> None:
        self.selection.require(len(cohort), f"{at.stage} round {at.index} (secure aggregation)")
        if len(cohort) < MIN_COHORT:
            raise FederationError(f"{at.stage}: secure aggregation needs at least {MIN_COHORT} clients")

    def _agree_keys(self, at: RoundId, cohort: list[int], context: str) -> tuple[dict[int, np.ndarray], Exchange]:
        """Each member's fresh public key -> ({client: key}, the exchange with its drops reworded)."""
        request = wire.encode({}, context=context)
        keys = self.transport.call(f"{at.stage}-keys", at.index, "secagg_keys", {c: request for c in cohort})
        keys.dropped = {cid: f"{reason} (before masks were agreed)" for cid, reason in keys.dropped.items()}
        public = {}
        for cid, payload in keys.answers.items():
            try:
                key = wire.decode(payload, wire.upload_limit(32, itemsize=1))[0]["public_key"]
                if key.dtype != np.uint8:
                    raise FederationError(f"public key of {key.dtype}, expected uint8[32]")
                public[cid] = key.reshape(32)
            except (IfediclError, KeyError, ValueError) as err:
                keys.dropped[cid] = f"rejected key: {err}"
        return public, keys

    def _mean(
        self, at: RoundId, uploads: list[np.ndarray], members: list[ClientUpdate], shape: tuple[int, ...]
    ) -> np.ndarray:
        """The masks cancel in the ring sum: what is left is the cohort's sum, divided into its mean."""
        total = unmask_sum(uploads, shape)
        bound = sum_bound(members, self.weighted, self.value_bound)
        largest = float(np.max(np.abs(total))) if total.size else 0.0
        if not largest <= bound:  # NaN-safe: a sum that is not finite fails here too
            raise FederationError(
                f"{at.stage} round {at.index}: the securely aggregated sum reaches {largest:.3g}, beyond the "
                f"{bound:.3g} an honest cohort of {len(members)} can reach (+-{self.value_bound:g} per value); "
                "a member uploaded garbage. Nothing was aggregated or published"
            )
        divisor = sum(u.num_examples for u in members) if self.weighted else len(members)
        mean = total / divisor
        if not np.all(np.isfinite(mean)):
            raise FederationError(f"{at.stage} round {at.index}: the securely aggregated sum is not finite")
        return mean.astype(np.float32)
