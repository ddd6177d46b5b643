"""Secure aggregation with double masking and dropout recovery (SecAgg+, Bonawitz et al. 2017).

Why: with it the server learns only the *sum* of the cohort's vectors or Λ, never one client's
value, and a client lost halfway costs nothing but its own contribution (same round, no redo).

One aggregation (stage-1 vectors; Λ each round) is four requests, each client's answers relayed
or combined by the server:

1. ``secagg_keys``: each client makes two fresh X25519 key pairs, ``c`` (to encrypt shares to its
   peers) and ``s`` (for pairwise masks), and advertises both publics. The cohort ``U1`` is whoever
   answered; the threshold ``t`` is fixed from its size (:func:`threshold_for`).
2. ``secagg_share``: the server relays every key of ``U1`` and ``t``. Each client draws a self-mask
   seed ``b_u`` and Shamir-shares ``b_u`` and its ``s`` secret key among ``U1`` with threshold ``t``
   (pycryptodome's Shamir over GF(2^128): each 32-byte secret as two 16-byte halves). The share for
   peer ``v`` is encrypted with ChaCha20-Poly1305 under a key derived from the ``c`` agreement of
   ``u`` and ``v``, with sender, recipient and the round bound in the associated data; the server
   relays ciphertexts it cannot read. ``U2``: the clients whose shares came.
3. ``secagg_upload``: each client of ``U2`` gets the ciphertexts addressed to it, decrypts them and
   uploads ``y_u = x_u + PRG(b_u) + Σ_v ±PRG(s_uv)`` over ``v`` in ``U2`` (``s_uv``: the ``s``
   agreement of ``u`` and ``v``; ``+`` if ``u < v``), fixed point in the ring Z/2^64 (uint64 wraps,
   so every mask cancels *exactly*). ``U3``: the clients whose upload was accepted.
4. ``secagg_unmask``: the server tells each client of ``U3`` who uploaded (``U3``) and who dropped
   (``U2 - U3``). Each answers its shares of ``b_v`` for the uploaders and of ``s_v`` for the dropped.
   The server reconstructs each uploader's ``b_v`` (removes its self mask) and each dropped client's
   ``s_v`` key (recomputes its pairwise masks with the uploaders and removes them). Left: ``Σ x_u``
   over ``U3``. It needs ``t`` answers; fewer, and the round fails cleanly (nothing published).

So a client may drop before advertising keys, before sharing, before its masked upload (its
pairwise masks are recovered) or after it (its self mask is recovered): the sum of the uploaders
is exact in the same round as long as ``t`` clients answer the unmasking.

Why double masking: pairwise masks alone hide a value only until the server learns the pair
secrets; recovering a dropped client's masks reveals ``s_v``. If that client's upload then shows
up late (a straggler declared dropped), the server could strip its pairwise masks and read its
value -- the old design's redo leaked exactly this way (first attempt's sum minus the redo's).
With a self mask ``PRG(b_v)`` on top, the server needs both ``s_v`` *and* ``b_v`` for any one
client, and an honest client **never reveals both kinds of share for the same peer** in a round:
whoever it was told dropped gets ``s`` shares, whoever uploaded ``b`` shares, never both, and a
later request that would reveal the other kind is refused. A client also refuses an unmasking
whose sets are inconsistent (not a partition of the clients it masked with, itself not among the
uploaders, fewer than ``t`` uploaders), and a threshold at or below half the cohort: with
``t > n/2`` even a server that told two halves of the cohort different stories could not collect
``t`` shares of each kind for one client. And a hosted client masks a value once (its second
``secagg_keys`` for it is refused): two aggregations of the same values over different cohorts
would differ by a member's value, which is why the old redo with fresh keys had to go.

The threshold ``t``: by default the smallest majority of the key-advertising cohort ``n``
(``floor(n/2) + 1``), never below 2 (``threshold`` of :class:`SecureFedAvg`: the fraction of ``n``
that ``t`` must exceed, in [0.5, 1)). A larger ``t`` tolerates fewer dropouts (``n - t``) and
needs a larger coalition to unmask. E.g. 3 clients: ``t`` = 2; 10 clients: ``t`` = 6.

Threat model: an honest-but-curious server (follows the protocol, relays keys and ciphertexts
unchanged, but looks at everything it sees, late answers included); clients do not collude with
it beyond ``t - 1`` of them (``t`` colluding clients holding shares could rebuild any secret).
Protected: every single client's value, also against a late upload and a stored history of the
round's messages. Not protected: a server that swaps the relayed public keys (a man in the middle
between clients; signing the ephemeral keys with each organisation's long-term key, SecAgg+'s
malicious-server variant, would close it and is not done), a server that deliberately drops
honest clients until only a few remain (clients refuse fewer than ``t`` uploaders and the cohort
must stay at least ``MIN_COHORT`` and ``--min-clients``), and the sum itself (which is the
point: DP noise added by each client is what protects a value in a small sum).

Bad messages: the server checks each answer's size before decoding it (:mod:`wire` limits) and its
form after; a malformed key advertisement, share bundle, masked upload or unmasking answer is
that client's recorded rejection, and it counts as dropped at that step (the round goes on if ``t``
remain). The server cannot read shares: a recipient that cannot decrypt one (tampered, wrong
sender, not a share) or gets one from a stranger ignores it and reports the sender; the server
then leaves that sender out of the sum as if it dropped before its upload (its masks are
removed with its recovered key), and records why. The server cannot check one member's value (it
never sees it), only the sum: a well-formed upload of garbage ring elements leaves its noise in
the sum (uniform in +-5.5e11 per coordinate). Every honest member's value is at most
``MAX_ABS_VALUE`` per coordinate (times N_k when weighted), so a sum beyond the cohort's total of
that (:func:`sum_bound`) proves a member uploaded garbage: the aggregation fails cleanly and
nothing is published. Who it was cannot be told, so the run fails rather than going on without
them. A member that stays inside the bound but shifts the sum is not detected (that needs robust
rules, which need updates in the clear). Wrong shares sent back in the unmasking are caught when
the rebuilt secret does not match its public key (``s``) or its commitment (``b``, a SHA-256 of
the seed sent with the shares): the round fails naming the client.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from typing import Protocol

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

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
THRESHOLD = 0.5  # default: t is the smallest count above half the key-advertising cohort (a majority)

KEY_BYTES = 32  # an X25519 public or private key; also the self-mask seed b_u and its commitment
SHARE_BYTES = 32  # one share of a 32-byte secret: two 16-byte Shamir shares (GF(2^128))
_SHARE_PLAIN = struct.Struct("<I")  # the share's Shamir index, then its b share and its s share
NONCE_BYTES, TAG_BYTES = 12, 16  # ChaCha20-Poly1305
CIPHERTEXT_BYTES = NONCE_BYTES + _SHARE_PLAIN.size + 2 * SHARE_BYTES + TAG_BYTES  # 96
ID_BYTES = 12  # what one client id may take in a message's JSON metadata (its size limit allows it)


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


def _mask(seed: bytes, context: bytes, size: int) -> np.ndarray:
    """PRG(seed): HKDF(seed, context) -> ChaCha20 keystream -> ``size`` uint64."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ifedicl-secagg|" + context).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor().update(b"\x00" * (8 * size))
    return np.frombuffer(stream, dtype=np.uint64)


def self_mask(seed: bytes, context: bytes, client: int, size: int) -> np.ndarray:
    """PRG(b_u): client ``client``'s self mask for the round ``context``. -> uint64[size]."""
    return _mask(seed, context + f"|self|{client}".encode(), size)


def pair_mask(private: X25519PrivateKey, peer_public: bytes, me: int, peer: int, context: bytes, size: int):
    """What ``me`` adds for the pair (me, peer): +PRG(s_uv) if me < peer, else -PRG(s_uv). -> uint64[size].

    Both ends derive the same s_uv (X25519), so the two contributions cancel in the ring sum; the
    server, holding a dropped client's recovered key, computes that client's side the same way."""
    secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted((me, peer))
    mask = _mask(secret, context + f"|{low}|{high}".encode(), size)
    if me < peer:
        return mask
    with np.errstate(over="ignore"):
        return np.zeros_like(mask) - mask


def threshold_for(cohort_size: int, fraction: float = THRESHOLD) -> int:
    """t for ``cohort_size`` key-advertising clients: the smallest count above ``fraction`` of them, >= 2, <= n."""
    return min(cohort_size, max(MIN_COHORT, math.floor(fraction * cohort_size) + 1))


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """A 32-byte secret -> ``count`` shares of 32 bytes (two Shamir halves); share i has Shamir index i + 1."""
    halves = [Shamir.split(threshold, count, secret[i : i + 16]) for i in (0, 16)]
    shares = []
    for i, (low, high) in enumerate(zip(*halves)):
        if not low[0] == high[0] == i + 1:  # pycryptodome numbers its shares 1..n in order
            raise FederationError("secure aggregation: unexpected Shamir share numbering")
        shares.append(low[1] + high[1])
    return shares


def combine_secret(shares: dict[int, bytes], threshold: int) -> bytes:
    """{Shamir index: 32-byte share} (at least ``threshold`` of them) -> the 32-byte secret."""
    chosen = sorted(shares.items())[:threshold]  # pycryptodome's combine takes exactly t shares
    return b"".join(Shamir.combine([(i, share[h : h + 16]) for i, share in chosen]) for h in (0, 16))


def commitment(seed: bytes, context: bytes, client: int) -> bytes:
    """SHA-256 of a self-mask seed, bound to the round and client: lets the server check its reconstruction."""
    return hashlib.sha256(b"ifedicl-secagg-commit|" + context + f"|{client}|".encode() + seed).digest()


def _share_cipher(private: X25519PrivateKey, peer_public: bytes, context: bytes, sender: int, recipient: int):
    """The AEAD for shares from ``sender`` to ``recipient`` (one key per direction and round)."""
    secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = b"ifedicl-secagg-share|" + context + f"|{sender}->{recipient}".encode()
    return ChaCha20Poly1305(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret))


def _share_ad(context: bytes, sender: int, recipient: int) -> bytes:
    return b"ifedicl-secagg-share|" + context + f"|from {sender}|to {recipient}".encode()


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _public(key: X25519PrivateKey) -> np.ndarray:
    return np.frombuffer(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), dtype=np.uint8)


def _ids(value: object, what: str) -> list[int]:
    """A list of distinct client ids from a message's metadata, else FederationError."""
    if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        raise FederationError(f"{what} is not a list of client ids")
    if len(set(value)) != len(value):
        raise FederationError(f"{what} names a client twice")
    return [int(c) for c in value]


def _array(arrays: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``arrays[name]`` as uint8 of exactly ``shape``, else FederationError."""
    value = arrays.get(name)
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.shape != shape:
        kind = f"{value.dtype}{list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
        raise FederationError(f"{name} is {kind}, expected uint8{list(shape)}")
    return value


class MaskingClient:
    """A client's side of one round's secure aggregation: fresh keys, shares, one masked upload, unmasking.

    Each method is one server request (bytes in, bytes out; the names are the requests'), to be
    called in order, each once, except :meth:`secagg_unmask`, which may be asked again but never so
    that it would reveal a ``b`` share and an ``s`` share of the same peer. A refusal raises
    :class:`FederationError` (the server records the client as failed at that step).
    """

    def __init__(self, client_id: int, value: np.ndarray):
        self.client_id = client_id
        self.value = np.asarray(value, dtype=np.float64)  # x_u (times N_u when weighted)
        self._c = X25519PrivateKey.generate()  # encrypts the shares to peers
        self._s = X25519PrivateKey.generate()  # pairwise masks
        self._seed = os.urandom(KEY_BYTES)  # b_u: the self mask's seed (OS entropy)
        self.step = "new"
        self.context = b""
        self.cohort: list[int] = []  # U1, as the share request named it
        self.threshold = 0
        self.c_keys: dict[int, bytes] = {}
        self.s_keys: dict[int, bytes] = {}
        self.held: dict[int, tuple[bytes, bytes]] = {}  # peer -> (its b share, its s share) for this client
        self.masked_with: list[int] = []  # U2, as the upload request named it
        self.revealed: dict[int, str] = {}  # peer -> "b" or "s": the one kind of share it may ever reveal

    def _request(self, payload: bytes, step: str) -> tuple[dict, dict]:
        arrays, meta = wire.decode(payload)
        context = str(meta.get("context", "")).encode()
        if step == "new":
            if not context:
                raise FederationError(f"client {self.client_id}: a secure aggregation request without a context")
            self.context = context
        elif context != self.context:
            raise FederationError(f"client {self.client_id}: a request for another round ({context!r})")
        if self.step != step:
            raise FederationError(f"client {self.client_id}: secure aggregation request out of order (at {self.step})")
        return arrays, meta

    # ------------------------------------------------------------------ 1. advertise keys
    def secagg_keys(self, payload: bytes) -> bytes:
        """Both public keys -> ``{"c_public", "s_public"}`` uint8[32] each; only public halves leave."""
        self._request(payload, "new")
        self.step = "advertised"
        return wire.encode({"c_public": _public(self._c), "s_public": _public(self._s)})

    # ------------------------------------------------------------------ 2. share secrets
    def secagg_share(self, payload: bytes) -> bytes:
        """Cohort U1 with its keys and t -> encrypted shares of b_u and s_u for every peer, b_u's commitment."""
        arrays, meta = self._request(payload, "advertised")
        me = self.client_id
        cohort = _ids(meta.get("cohort"), "the cohort")
        n = len(cohort)
        if me not in cohort:
            raise FederationError(f"client {me} is not in the masking cohort")
        if n < MIN_COHORT:
            raise FederationError(f"refusing to mask for a cohort of {n} (< {MIN_COHORT})")
        t = meta.get("threshold")
        if isinstance(t, bool) or not isinstance(t, int) or not (MIN_COHORT <= t <= n and 2 * t > n):
            raise FederationError(
                f"client {me}: refusing threshold {t!r} for a cohort of {n} (needs {MIN_COHORT} <= t <= n and t > n/2)"
            )
        c_rows, s_rows = (_array(arrays, name, (n, KEY_BYTES)) for name in ("c_keys", "s_keys"))
        mine = cohort.index(me)
        if not (np.array_equal(c_rows[mine], _public(self._c)) and np.array_equal(s_rows[mine], _public(self._s))):
            raise FederationError(f"client {me}: the relayed key list does not carry its own keys")
        keys = [bytes(k) for k in (*c_rows, *s_rows)]
        if len(set(keys)) != len(keys):
            raise FederationError(f"client {me}: duplicate public keys in the cohort")
        self.cohort, self.threshold = cohort, t
        self.c_keys = {c: bytes(k) for c, k in zip(cohort, c_rows)}
        self.s_keys = {c: bytes(k) for c, k in zip(cohort, s_rows)}
        b_shares, s_shares = split_secret(self._seed, t, n), split_secret(_raw(self._s), t, n)
        ciphertexts, recipients = [], []
        for i, peer in enumerate(cohort):
            if peer == me:
                self.held[me] = (b_shares[i], s_shares[i])
                continue
            plain = _SHARE_PLAIN.pack(i + 1) + b_shares[i] + s_shares[i]
            nonce = os.urandom(NONCE_BYTES)
            box = _share_cipher(self._c, self.c_keys[peer], self.context, me, peer)
            ciphertexts.append(nonce + box.encrypt(nonce, plain, _share_ad(self.context, me, peer)))
            recipients.append(peer)
        self.step = "shared"
        rows = np.frombuffer(b"".join(ciphertexts), dtype=np.uint8).reshape(len(recipients), CIPHERTEXT_BYTES)
        commit = np.frombuffer(commitment(self._seed, self.context, me), dtype=np.uint8)
        return wire.encode({"ciphertexts": rows, "b_commitment": commit}, recipients=recipients)

    def _open(self, sender: int, ciphertext: bytes) -> tuple[bytes, bytes]:
        """A peer's share for this client -> (b share, s share); anything else: FederationError."""
        if len(ciphertext) != CIPHERTEXT_BYTES:
            raise FederationError(f"a share of {len(ciphertext)} bytes")
        box = _share_cipher(self._c, self.c_keys[sender], self.context, sender, self.client_id)
        nonce = ciphertext[:NONCE_BYTES]
        try:
            plain = box.decrypt(nonce, ciphertext[NONCE_BYTES:], _share_ad(self.context, sender, self.client_id))
        except InvalidTag:
            raise FederationError("a share that does not decrypt") from None
        (index,) = _SHARE_PLAIN.unpack_from(plain)
        if index != self.cohort.index(self.client_id) + 1:
            raise FederationError(f"a share numbered {index}, not this client's")
        body = plain[_SHARE_PLAIN.size :]
        return body[:SHARE_BYTES], body[SHARE_BYTES:]

    # ------------------------------------------------------------------ 3. masked upload
    def secagg_upload(self, payload: bytes) -> bytes:
        """U2 and the peers' ciphertexts -> ``{"masked"}`` uint64[size], and the senders whose share was bad."""
        arrays, meta = self._request(payload, "shared")
        me = self.client_id
        members = _ids(meta.get("cohort"), "the masking set")
        senders = _ids(meta.get("senders"), "the senders")
        if me not in members:
            raise FederationError(f"client {me} is not in the masking set")
        if not set(members) <= set(self.cohort):
            raise FederationError(f"client {me}: the masking set names clients that advertised no keys")
        if len(members) < self.threshold:
            raise FederationError(
                f"client {me}: refusing to mask for {len(members)} clients, fewer than the threshold {self.threshold}"
            )
        rows = arrays.get("ciphertexts")
        if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 or len(rows) != len(senders):
            raise FederationError(f"client {me}: the relayed shares do not match their senders")
        bad = set()
        for sender, row in zip(senders, rows):
            if sender == me or sender not in members or sender in self.held:  # a stranger, or a second share
                bad.add(sender)
                continue
            try:
                self.held[sender] = self._open(sender, row.tobytes())
            except FederationError:
                bad.add(sender)
        bad |= set(members) - set(self.held)  # a member whose share never came
        out = encode_fixed(self.value).reshape(-1).copy()  # [size] uint64
        with np.errstate(over="ignore"):
            out = out + self_mask(self._seed, self.context, me, out.size)
            for peer in members:
                if peer != me:
                    out = out + pair_mask(self._s, self.s_keys[peer], me, peer, self.context, out.size)
        self.masked_with = sorted(members)
        self.step = "uploaded"
        return wire.encode({"masked": out}, bad_senders=sorted(bad))

    # ------------------------------------------------------------------ 4. unmasking
    def secagg_unmask(self, payload: bytes) -> bytes:
        """Who uploaded, who dropped -> b shares of the uploaders, s shares of the dropped (never both per peer)."""
        _, meta = self._request(payload, "uploaded")
        me = self.client_id
        uploaded = _ids(meta.get("uploaded"), "the uploaders")
        dropped = _ids(meta.get("dropped"), "the dropped clients")
        if set(uploaded) & set(dropped):
            both = sorted(set(uploaded) & set(dropped))
            raise FederationError(f"client {me}: refusing to reveal both shares of clients {both}")
        if me not in uploaded:
            raise FederationError(f"client {me}: refusing an unmasking that does not count its own upload")
        if sorted(uploaded + dropped) != self.masked_with:
            raise FederationError(f"client {me}: the announced sets are not the clients it masked with")
        if len(uploaded) < self.threshold:
            raise FederationError(
                f"client {me}: refusing an unmasking of {len(uploaded)} uploaders, fewer than the threshold "
                f"{self.threshold}"
            )
        asked = {**{v: "b" for v in uploaded}, **{v: "s" for v in dropped}}
        crossed = sorted(v for v, kind in asked.items() if self.revealed.get(v, kind) != kind)
        if crossed:
            raise FederationError(
                f"client {me}: refusing to reveal both shares of clients {crossed} (it already revealed the other kind)"
            )
        self.revealed.update(asked)
        b_peers = [v for v in uploaded if v in self.held]
        s_peers = [v for v in dropped if v in self.held]
        b = np.frombuffer(b"".join(self.held[v][0] for v in b_peers), np.uint8).reshape(len(b_peers), SHARE_BYTES)
        s = np.frombuffer(b"".join(self.held[v][1] for v in s_peers), np.uint8).reshape(len(s_peers), SHARE_BYTES)
        return wire.encode({"b_shares": b, "s_shares": s}, b_peers=b_peers, s_peers=s_peers)


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


def ring_sum(uploads: list[np.ndarray], size: int) -> np.ndarray:
    """The ring sum of masked uploads, uint64[size] (wraps mod 2^64)."""
    total = np.zeros(size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for upload in uploads:
            total = total + check_masked(upload, size)
    return total


class Transport(Protocol):
    """How the server reaches the cohort during aggregation (the Ray client pool implements it)."""

    session: str  # unique per run: binds every mask to this run

    def call(self, stage: str, round_index: int, method: str, requests: dict[int, bytes]) -> Exchange:
        """Send each client its request; answers, drops (died, timed out) and bytes come back."""

    def exclude(self, client_id: int) -> None:
        """Never ask this client again in this run."""


class _Round:
    """One aggregation's running account: its context, bytes, and who dropped at which step and why."""

    def __init__(self, strategy: SecureFedAvg, at: RoundId):
        self.strategy, self.at = strategy, at
        self.context = f"{strategy.transport.session}|{at.stage}|{at.index}"
        self.traffic = Traffic()
        self.dropped: dict[int, str] = {}

    def call(self, suffix: str, method: str, requests: dict[int, bytes], step: str) -> Exchange:
        """One request to the cohort; its drops recorded with the step they happened at."""
        answer = self.strategy.transport.call(f"{self.at.stage}-{suffix}", self.at.index, method, requests)
        self.traffic += answer.traffic
        for cid, reason in answer.dropped.items():
            self.drop(cid, f"{reason} ({step})", excluded=True)
        return answer

    def drop(self, cid: int, reason: str, excluded: bool = False) -> None:
        self.dropped[cid] = reason
        if not excluded:
            self.strategy.transport.exclude(cid)
        log_event("secagg_dropout", stage=self.at.stage, round=self.at.index, client=cid, reason=reason)

    def require(self, what: str, count: int, threshold: int, cohort: int) -> None:
        if count < threshold:
            raise FederationError(
                f"{self.at.stage} round {self.at.index}: secure aggregation needs {threshold} of the {cohort} "
                f"clients that advertised keys to have {what}; only {count} did. Nothing was aggregated or published"
            )

    def decode(self, cid: int, payload: object, limit: int) -> tuple[dict, dict]:
        """An answer of at most ``limit`` bytes (checked before anything parses it), decoded."""
        return wire.decode(wire.check_size(payload, limit, cid))


class SecureFedAvg(Strategy):
    """FedAvg of values the server never sees one by one: clients upload counts, then masked values.

    ``aggregate`` runs the double-masking protocol of the module docstring over ``transport`` (keys,
    shares, masked uploads, unmasking); what is left is the uploaders' sum, divided by their number
    (or their public example count, weighted) into the mean. Clients lost on the way drop out of
    the sum in the same round; it fails cleanly if fewer than the threshold remain.
    """

    masked = True

    def __init__(
        self,
        transport: Transport,
        weighted: bool = False,
        selection: ClientSelection = ClientSelection(),
        value_bound: float = MAX_ABS_VALUE,
        threshold: float = THRESHOLD,
    ):
        super().__init__(selection, weighted)
        if not 0.5 <= threshold < 1:
            raise FederationError(f"secure aggregation threshold {threshold} must be in [0.5, 1) of the cohort")
        self.transport = transport
        self.value_bound = value_bound  # the most |value| per coordinate an honest member uploads (see sum_bound)
        self.threshold = threshold  # t: the smallest count above this fraction of the cohort (threshold_for)

    def aggregate(self, at: RoundId, updates: list[ClientUpdate], reference: np.ndarray | None = None) -> Aggregate:
        self.selection.require(len(updates), at.name)
        by_id = {u.client_id: u for u in updates}
        shape = updates[0].values.shape
        size = int(np.prod(shape))
        run = _Round(self, at)
        c_keys, s_keys = self._advertise(run, sorted(by_id))
        cohort = sorted(c_keys)  # U1
        self._require_cohort(at, cohort)
        n = len(cohort)
        t = threshold_for(n, self.threshold)
        commitments, boxes = self._share(run, cohort, c_keys, s_keys, t)
        sharers = sorted(commitments)  # U2
        run.require("shared their secrets", len(sharers), t, n)
        uploads = self._masked(run, sharers, boxes, size)
        uploaded = sorted(uploads)  # U3
        gone = sorted(set(sharers) - set(uploaded))  # shared, but not in the sum: their pairwise masks are removed
        run.require("uploaded a masked value", len(uploaded), t, n)
        self._require_cohort(at, uploaded)
        b_shares, s_shares = self._unmask(run, cohort, uploaded, gone, t)
        total = ring_sum([uploads[c] for c in uploaded], size)
        context = run.context.encode()
        with np.errstate(over="ignore"):
            for v in uploaded:  # remove each uploader's self mask
                seed = combine_secret(b_shares[v], t)
                if commitment(seed, context, v) != commitments[v]:
                    raise FederationError(
                        f"{at.stage} round {at.index}: the shares of client {v}'s self-mask seed do not rebuild it "
                        "(a wrong share came back); nothing was published"
                    )
                total = total - self_mask(seed, context, v, size)
            for v in gone:  # add each dropped client's side of its pairs with the uploaders: they cancel
                key = X25519PrivateKey.from_private_bytes(combine_secret(s_shares[v], t))
                if _public(key).tobytes() != s_keys[v]:
                    raise FederationError(
                        f"{at.stage} round {at.index}: the shares of client {v}'s mask key do not rebuild it "
                        "(a wrong share came back); nothing was published"
                    )
                for u in uploaded:
                    total = total + pair_mask(key, s_keys[u], v, u, context, size)
        if gone:
            log_event("secagg_recovered", stage=at.stage, round=at.index, dropped=gone, uploaded=uploaded, threshold=t)
        members = [by_id[c] for c in uploaded]
        mean = self._mean(at, decode_fixed(total).reshape(shape), members)
        return Aggregate(mean, members, run.dropped, run.traffic)

    def _require_cohort(self, at: RoundId, cohort: list[int]) -> None:
        self.selection.require(len(cohort), f"{at.stage} round {at.index} (secure aggregation)")
        if len(cohort) < MIN_COHORT:
            raise FederationError(f"{at.stage}: secure aggregation needs at least {MIN_COHORT} clients")

    def _advertise(self, run: _Round, cohort: list[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """1. Each member's two fresh public keys -> ({client: c public}, {client: s public})."""
        request = wire.encode({}, context=run.context)
        asked = run.call("keys", "secagg_keys", {c: request for c in cohort}, "before advertising its keys")
        c_keys, s_keys, seen = {}, {}, set()
        for cid, payload in sorted(asked.answers.items()):
            try:
                arrays, _ = run.decode(cid, payload, wire.upload_limit(2 * KEY_BYTES, tensors=2, itemsize=1))
                pair = tuple(_array(arrays, name, (KEY_BYTES,)).tobytes() for name in ("c_public", "s_public"))
                if seen & set(pair) or pair[0] == pair[1]:
                    raise FederationError("a public key another client advertised")
            except (IfediclError, ValueError) as err:
                run.drop(cid, f"rejected key advertisement: {err}")
                continue
            seen |= set(pair)
            c_keys[cid], s_keys[cid] = pair
        return c_keys, s_keys

    def _share(
        self, run: _Round, cohort: list[int], c_keys: dict, s_keys: dict, t: int
    ) -> tuple[dict[int, bytes], dict[int, dict[int, bytes]]]:
        """2. Relay U1's keys and t; collect each client's encrypted shares -> ({client: b commitment},
        {recipient: {sender: ciphertext}})."""
        keyring = {name: np.frombuffer(b"".join(keys[c] for c in cohort), np.uint8).reshape(len(cohort), KEY_BYTES)
                   for name, keys in (("c_keys", c_keys), ("s_keys", s_keys))}  # fmt: skip
        request = wire.encode(keyring, context=run.context, cohort=cohort, threshold=t)
        step = "after advertising keys, before sharing its secrets"
        asked = run.call("shares", "secagg_share", {c: request for c in cohort}, step)
        rows = len(cohort) - 1
        limit = wire.upload_limit(rows * CIPHERTEXT_BYTES + KEY_BYTES, tensors=2, itemsize=1) + ID_BYTES * rows
        commitments, boxes = {}, {c: {} for c in cohort}
        for cid, payload in sorted(asked.answers.items()):
            try:
                arrays, meta = run.decode(cid, payload, limit)
                recipients = _ids(meta.get("recipients"), "the recipients")
                if recipients != [c for c in cohort if c != cid]:
                    raise FederationError("shares not addressed to exactly the other clients of the cohort")
                ciphertexts = _array(arrays, "ciphertexts", (rows, CIPHERTEXT_BYTES))
                commit = _array(arrays, "b_commitment", (KEY_BYTES,)).tobytes()
            except (IfediclError, ValueError) as err:
                run.drop(cid, f"rejected secret shares: {err}")
                continue
            commitments[cid] = commit
            for recipient, row in zip(recipients, ciphertexts):
                boxes[recipient][cid] = row.tobytes()
        return commitments, boxes

    def _masked(self, run: _Round, sharers: list[int], boxes: dict, size: int) -> dict[int, np.ndarray]:
        """3. Relay each sharer its peers' ciphertexts; collect the masked uploads -> {client: uint64[size]}.

        A sender whose share a recipient rejected is left out of the sum (as if it had dropped before its
        upload); a recipient reporting anything but clients of the cohort is itself rejected."""
        requests = {}
        for cid in sharers:
            senders = [s for s in sharers if s != cid]
            rows = np.frombuffer(b"".join(boxes[cid][s] for s in senders), np.uint8).reshape(-1, CIPHERTEXT_BYTES)
            requests[cid] = wire.encode({"ciphertexts": rows}, context=run.context, cohort=sharers, senders=senders)
        step = "after sharing, before its masked upload: its masks were removed with its recovered key"
        asked = run.call("masked", "secagg_upload", requests, step)
        limit = wire.upload_limit(size, itemsize=8) + ID_BYTES * len(sharers)  # uint64 ring elements
        uploads, accused = {}, {}
        for cid, payload in sorted(asked.answers.items()):
            try:
                arrays, meta = run.decode(cid, payload, limit)
                masked = check_masked(arrays.get("masked"), size)
                bad = _ids(meta.get("bad_senders", []), "the senders it rejected")
                if not set(bad) <= set(sharers) - {cid}:
                    raise FederationError("it rejected shares of clients that sent it none")
            except (IfediclError, ValueError) as err:
                run.drop(cid, f"rejected masked upload: {err}")
                continue
            uploads[cid] = masked
            for sender in bad:
                accused.setdefault(sender, []).append(cid)
        for sender, by in sorted(accused.items()):
            uploads.pop(sender, None)
            if sender not in run.dropped:
                run.drop(sender, f"rejected secret shares: client(s) {by} could not open its share (it did not "
                                 "decrypt or was not one); left out of the sum, its masks removed")  # fmt: skip
        return uploads

    def _unmask(
        self, run: _Round, cohort: list[int], uploaded: list[int], gone: list[int], t: int
    ) -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
        """4. Tell the uploaders who uploaded and who dropped; collect b shares of the first, s shares of the
        second -> ({uploader: {Shamir index: share}}, {dropped: {Shamir index: share}}), t of each at least."""
        request = wire.encode({}, context=run.context, uploaded=uploaded, dropped=gone)
        step = "after its masked upload, during the unmasking: its value is in the sum"
        asked = self.transport.call(f"{run.at.stage}-unmask", run.at.index, "secagg_unmask",
                                    {c: request for c in uploaded})  # fmt: skip
        run.traffic += asked.traffic
        for cid, reason in asked.dropped.items():  # in the sum all the same: logged, not a drop of the round
            reason = f"{reason} ({step})"
            log_event("secagg_unmask_lost", stage=run.at.stage, round=run.at.index, client=cid, reason=reason)
        peers = len(uploaded) + len(gone)
        limit = wire.upload_limit(peers * SHARE_BYTES, tensors=2, itemsize=1) + ID_BYTES * peers
        b_shares = {v: {} for v in uploaded}
        s_shares = {v: {} for v in gone}
        answered = 0
        for cid, payload in sorted(asked.answers.items()):
            try:
                arrays, meta = run.decode(cid, payload, limit)
                b_peers, s_peers = _ids(meta.get("b_peers"), "b_peers"), _ids(meta.get("s_peers"), "s_peers")
                if not (set(b_peers) <= set(uploaded) and set(s_peers) <= set(gone)):
                    raise FederationError("shares of clients it was not asked about")
                b = _array(arrays, "b_shares", (len(b_peers), SHARE_BYTES))
                s = _array(arrays, "s_shares", (len(s_peers), SHARE_BYTES))
            except (IfediclError, ValueError) as err:
                self.transport.exclude(cid)
                log_event("secagg_unmask_rejected", stage=run.at.stage, round=run.at.index, client=cid, error=str(err))
                continue
            answered += 1
            index = cohort.index(cid) + 1  # its Shamir index: its place in U1
            for v, share in zip(b_peers, b):
                b_shares[v][index] = share.tobytes()
            for v, share in zip(s_peers, s):
                s_shares[v][index] = share.tobytes()
        run.require("answered the unmasking", answered, t, len(cohort))
        for kind, shares in (("self-mask seed", b_shares), ("mask key", s_shares)):
            for v, held in shares.items():
                run.require(f"returned a share of client {v}'s {kind}", len(held), t, len(cohort))
        return b_shares, s_shares

    def _mean(self, at: RoundId, total: np.ndarray, members: list[ClientUpdate]) -> np.ndarray:
        """The uploaders' sum (masks removed), checked against what an honest cohort can reach, into its mean."""
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
