"""What one request to a set of clients brought back: answers, drops, and bytes each way.

Why a value and not output parameters: a round makes several requests (the round's own,
then secure aggregation's key and masked-upload requests, then stage 1's broadcast), and
each one's drops and bytes are simply added up into the round's; nothing is threaded
through the methods that make them.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ifedicl.storage.records import RoundRecord

log = logging.getLogger("ifedicl.federation")


@dataclass
class Traffic:
    """Bytes per client: ``down`` what was sent to it, ``up`` what it answered (``len()`` of the wire payloads)."""

    down: Counter[int] = field(default_factory=Counter)
    up: Counter[int] = field(default_factory=Counter)

    def __add__(self, other: Traffic) -> Traffic:
        down, up = Counter(self.down), Counter(self.up)
        down.update(other.down)
        up.update(other.up)
        return Traffic(down, up)

    def only(self, clients: Iterable[int]) -> Traffic:
        """The part charged to ``clients`` (e.g. a broadcast counts only where it was acknowledged)."""
        keep = set(clients)
        return Traffic(
            Counter({c: n for c, n in self.down.items() if c in keep}),
            Counter({c: n for c, n in self.up.items() if c in keep}),
        )


@dataclass
class Exchange:
    """One request to several clients: who answered what, who was dropped and why, and the bytes."""

    answers: dict[int, object] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    traffic: Traffic = field(default_factory=Traffic)

    @classmethod
    def of(cls, requests: dict[int, bytes], answers: dict[int, object], dropped: dict[int, str]) -> Exchange:
        """Charge every addressee its request and every ``bytes`` answer to who sent it."""
        down = Counter({cid: len(payload) for cid, payload in requests.items()})
        up = Counter({cid: len(a) for cid, a in answers.items() if isinstance(a, bytes)})
        return cls(answers, dropped, Traffic(down, up))


@dataclass
class RoundOutcome:
    """One round as it happened, from all its requests together -> its one :class:`RoundRecord`."""

    index: int
    sampled: list[int]
    answered: list[int]  # the clients whose updates the round's value was made of
    dropped: dict[int, str]
    traffic: Traffic
    started: float  # time.monotonic() when the round began
    mean_loss: float | None = None

    @classmethod
    def collect(
        cls,
        index: int,
        sampled: list[int],
        used: list,  # [ClientUpdate]: the updates in the round's value
        started: float,
        dropped: Iterable[dict[int, str]],
        traffic: Iterable[Traffic],
    ) -> RoundOutcome:
        """Merge the round's requests in the order they happened (a later reason for a client wins)."""
        losses = [u.loss for u in used if u.loss is not None]
        reasons: dict[int, str] = {}
        for part in dropped:
            reasons.update(part)
        return cls(
            index,
            sampled,
            [u.client_id for u in used],
            reasons,
            sum(traffic, Traffic()),
            started,
            float(np.mean(losses)) if losses else None,
        )

    def record(self, finished: float | None = None) -> RoundRecord:
        """``finished``: when the round ended (default now)."""
        finished = time.monotonic() if finished is None else finished
        return RoundRecord(
            round=self.index,
            clients_sampled=self.sampled,
            clients_answered=self.answered,
            dropped=self.dropped,
            mean_loss=self.mean_loss,
            bytes_up=[self.traffic.up[c] for c in self.answered],
            bytes_down=[self.traffic.down[c] for c in self.sampled],
            seconds=finished - self.started,
        )


def log_event(event: str, **fields: object) -> None:
    """One JSON line per federation event (drops, rejections, rounds) on the ``ifedicl.federation`` logger."""
    log.info(json.dumps({"event": event, **fields}, default=str))


def log_round(run_id: str, record: RoundRecord) -> None:
    log_event(
        "round",
        run=run_id,
        round=record.round,
        sampled=len(record.clients_sampled),
        answered=len(record.clients_answered),
        dropped=record.dropped,
        mean_loss=record.mean_loss,
        bytes_up=sum(record.bytes_up),
        bytes_down=sum(record.bytes_down),
        bytes_up_per_client=max(record.bytes_up, default=0),
        seconds=round(record.seconds, 3),
    )
