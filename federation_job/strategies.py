"""The server role as Flower-shaped strategies: each one configures a round and aggregates it.

Stage 1 averages context vectors once; stage 2 averages Λ every round (FedAvg).
The paper uses unweighted means; weighting by N_k is offered for skewed splits.

Why one object per aggregation rule, owning its client selection: the driver then only
asks "whom, with what instructions?" (:meth:`Strategy.configure`) and "what is the
round's value?" (:meth:`Strategy.aggregate`). How many clients a round needs, what a
client must upload (in the clear or masked) and how updates are combined all live
with the rule, so the robust rules (:mod:`~ifedicl.federation_job.robust`), the norm
screen wrapped around any rule, and secure aggregation
(:mod:`~ifedicl.federation_job.secagg`) plug in the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ifedicl.federation_job import wire
from ifedicl.federation_job.exchange import Traffic
from ifedicl.kernel.errors import FederationError, IfediclError


@dataclass
class ClientUpdate:
    """One client's upload, decoded: values plus how many examples produced them."""

    client_id: int
    values: np.ndarray  # [L, 2, d] vectors or [L, 2, 2] coefficients
    num_examples: int
    loss: float | None = None
    holdout: tuple[int, float] | None = None  # (held-out examples, loss of the round's starting Λ on them)


# How a strategy reads one upload in the clear: (payload, client id) -> (values, wire metadata).
Reader = Callable[[bytes, int], tuple[np.ndarray, dict]]


def sample_clients(available: list[int], fraction: float, min_clients: int, rng: np.random.Generator) -> list[int]:
    """Clients asked to train this round: ``fraction`` of those alive, never fewer than ``min_clients``."""
    if not available:
        return []
    count = min(len(available), max(min_clients, int(round(fraction * len(available)))))
    return sorted(int(c) for c in rng.choice(available, size=count, replace=False))


# The largest magnitude any value of an upload may have (vectors, Λ, LoRA adapters). Honest values are
# far below it (LLM activations reach ~1e3-1e4 in their largest channels; Λ starts at 0.1 and 1). Why a
# bound at all: a finite but absurd value (3e38) passes the finite check, and with two clients there is
# no norm screen; with it, every mean stays finite in float32 and a cohort of K < 5e5 members stays
# inside secure aggregation's fixed-point range (+-5.5e11), which is what bounds a masked sum.
MAX_ABS_VALUE = 1e6


def check_update(update: ClientUpdate, expected_shape: tuple[int, ...]) -> None:
    """Shape, a float dtype, finite values within +-MAX_ABS_VALUE, and a positive example count."""
    values = update.values
    if not isinstance(values, np.ndarray) or values.dtype.kind != "f":
        kind = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
        raise FederationError(f"client {update.client_id} sent values of type {kind}, expected floats")
    if values.shape != expected_shape:
        raise FederationError(f"client {update.client_id} sent shape {values.shape}, expected {expected_shape}")
    if not np.all(np.isfinite(values)):
        raise FederationError(f"client {update.client_id} sent non-finite values")
    if values.size and float(np.max(np.abs(values))) > MAX_ABS_VALUE:
        largest = float(np.max(np.abs(values)))
        raise FederationError(f"client {update.client_id} sent a value of magnitude {largest:.3g} > {MAX_ABS_VALUE:g}")
    if isinstance(update.num_examples, bool) or not 1 <= update.num_examples <= wire.MAX_EXAMPLES:
        raise FederationError(f"client {update.client_id} reported {update.num_examples} examples")


@dataclass(frozen=True)
class ClientSelection:
    """Whom a round asks, and the failure policy: a round with fewer than ``min_clients`` fails the run.

    Clients that die, time out or send a bad update are dropped from the round and recorded;
    the round goes on with the rest as long as at least ``min_clients`` of them remain.
    """

    fraction: float = 1.0  # of the alive clients, sampled per round
    min_clients: int = 1

    def select(self, available: list[int] | set[int], rng: np.random.Generator) -> list[int]:
        return sample_clients(sorted(available), self.fraction, self.min_clients, rng)

    def require(self, answered: int, what: str) -> None:
        if answered < self.min_clients:
            raise FederationError(
                f"{what}: only {answered} client(s) answered, fewer than min_clients={self.min_clients}; "
                "nothing was published"
            )


@dataclass(frozen=True)
class RoundId:
    """Which request of which round: ``stage`` names the request (as the hooks see it), ``name`` the round in errors."""

    stage: str
    index: int
    name: str


@dataclass(frozen=True)
class RoundPlan:
    """``configure``'s answer: the clients asked and what the strategy needs each upload to be."""

    clients: list[int]
    instructions: dict[str, object]  # wire metadata for the clients: mask the upload? weight it?

    def requests(self, payload: bytes) -> dict[int, bytes]:
        return {cid: payload for cid in self.clients}


@dataclass(frozen=True)
class RoundUpload:
    """What a Λ round asks each client for and how its upload reads: calibrated Λ in the clear (a fixed binary
    frame) by default, or what a wrapping rule needs instead (a second-order round's statistics)."""

    method: str  # the client request
    key: str
    shape: tuple[int, ...]
    read: Reader | None
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # arrays the request carries beside Λ
    meta: dict[str, object] = field(default_factory=dict)  # and its metadata beside the round's
    # [L, 2, 2] the Λ the clients compute at, when the rule steps from another Λ than the one the last round
    # published (a tail average publishes the mean of its iterates); None: the published one
    start: np.ndarray | None = None


@dataclass
class Aggregate:
    """``aggregate``'s answer: the round's value, the updates in it, and what it cost or dropped on the way."""

    value: np.ndarray
    used: list[ClientUpdate]
    dropped: dict[int, str] = field(default_factory=dict)  # rejected by a screen, or lost during masking
    traffic: Traffic = field(default_factory=Traffic)  # requests the aggregation itself made (secure aggregation)


class Strategy(ABC):
    """Configure a round, aggregate a round. Subclasses set ``masked`` if clients keep their value back."""

    masked = False  # True: clients upload only their example count, the value follows masked

    def __init__(self, selection: ClientSelection, weighted: bool = False):
        self.selection = selection
        self.weighted = weighted

    def configure(self, available: list[int] | set[int], rng: np.random.Generator) -> RoundPlan:
        """The round's clients and the upload instructions every one of them gets."""
        return RoundPlan(self.selection.select(available, rng), {"secagg": self.masked, "weighted": self.weighted})

    def decode(
        self, answers: dict[int, object], key: str, shape: tuple[int, ...], read: Reader | None = None
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        """Uploads -> checked updates, and {client: reason} for every upload that is not one.

        ``read`` parses an upload in the clear (a coded vector upload, a Λ frame); by default it is
        the safetensors array named ``key``. Masked answers carry only their count, read as safetensors.
        Each payload is untrusted: its size is checked against :meth:`upload_limit` before it is parsed,
        its reported facts by :func:`wire.upload_facts`, its values by :func:`check_update`; whatever
        fails, the client's upload is a recorded rejection and the others go on.
        """
        limit = self.upload_limit(shape)
        updates, rejected = [], {}
        for cid, payload in sorted(answers.items()):
            try:
                wire.check_size(payload, limit, cid)
                if self.masked:  # the value comes later, masked
                    values, meta = np.zeros(shape, np.float32), wire.decode(payload)[1]
                elif read is not None:
                    values, meta = read(payload, cid)
                else:
                    arrays, meta = wire.decode(payload)
                    values = arrays[key]
                num_examples, loss = wire.upload_facts(meta, cid)
                update = ClientUpdate(cid, values, num_examples, loss, wire.holdout_facts(meta, cid))
                check_update(update, shape)
                updates.append(update)
            except IfediclError as err:
                rejected[cid] = f"rejected update: {err}"
            except Exception as err:  # anything else a crafted payload can provoke is still that client's fault
                rejected[cid] = f"rejected update: {type(err).__name__}: {err}"
        return updates, rejected

    def round_upload(self, coefficients: np.ndarray) -> RoundUpload:
        """What a Λ round at ``coefficients`` [L, 2, 2] asks of each client: calibrated Λ, by default."""
        return RoundUpload("calibrate", "coefficients", coefficients.shape, wire.decode_coefficients)

    def upload_limit(self, shape: tuple[int, ...]) -> int:
        """The most bytes one upload for a value of ``shape`` may take: float32 values in up to two tensors
        (int8 vectors and their scales), or under masking only the count (the value follows masked)."""
        if self.masked:
            return wire.upload_limit(0, tensors=0)
        return wire.upload_limit(int(np.prod(shape)), tensors=2)

    @abstractmethod
    def aggregate(self, at: RoundId, updates: list[ClientUpdate], reference: np.ndarray | None = None) -> Aggregate:
        """The round's value from its updates (``reference``: the round's starting global value, if any)."""

    def state_arrays(self) -> dict[str, np.ndarray] | None:
        """What carries over between rounds (a server optimizer's moments), as arrays the store keeps with each
        round; None for a rule whose rounds depend on nothing but their start (every aggregation rule)."""
        return None

    def resume(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
        """Continue from stored :meth:`state_arrays` (checked against Λ's ``shape``): FederationError if unfit."""
        raise FederationError(f"{type(self).__name__} keeps no state to resume")


class WrappedStrategy(Strategy):
    """A rule around an ``inner`` one: clients, uploads and their checks are the inner rule's, so a subclass
    only changes what the round's value is (a server optimizer's step, a trust-region step)."""

    def __init__(self, inner: Strategy):
        super().__init__(inner.selection, inner.weighted)
        self.masked = inner.masked
        self.inner = inner

    def configure(self, available: list[int] | set[int], rng: np.random.Generator) -> RoundPlan:
        return self.inner.configure(available, rng)

    def decode(
        self, answers: dict[int, object], key: str, shape: tuple[int, ...], read: Reader | None = None
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        return self.inner.decode(answers, key, shape, read)

    def round_upload(self, coefficients: np.ndarray) -> RoundUpload:
        return self.inner.round_upload(coefficients)


class ClearTextStrategy(Strategy):
    """A rule that sees each update in the clear: check the quorum, then combine the values."""

    def aggregate(self, at: RoundId, updates: list[ClientUpdate], reference: np.ndarray | None = None) -> Aggregate:
        self.selection.require(len(updates), at.name)
        return Aggregate(self.combine(updates).astype(np.float32), list(updates))

    @abstractmethod
    def combine(self, updates: list[ClientUpdate]) -> np.ndarray:
        """[K] updates -> one value of the same shape."""


class FedAvg(ClearTextStrategy):
    """Mean of client updates, optionally weighted by each client's example count."""

    def __init__(self, weighted: bool = False, selection: ClientSelection = ClientSelection()):
        super().__init__(selection, weighted)

    def combine(self, updates: list[ClientUpdate]) -> np.ndarray:
        if not updates:
            raise FederationError("nothing to aggregate: no client update")
        stacked = np.stack([u.values.astype(np.float64) for u in updates])  # [K, ...]
        if self.weighted:
            weights = np.asarray([u.num_examples for u in updates], dtype=np.float64)
        else:
            weights = np.ones(len(updates), dtype=np.float64)
        weights /= weights.sum()
        return np.tensordot(weights, stacked, axes=1)
