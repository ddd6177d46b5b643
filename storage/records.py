"""What one round of a run writes to the store, as a plain record.

Kept apart from :mod:`ifedicl.storage.store` so the code that builds rounds (the
exchange on every client actor, the driver's summaries) does not import LanceDB:
a client actor never touches the store, and importing LanceDB cost each actor's
start ~3 s of CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RoundRecord:
    round: int
    clients_sampled: list[int]
    clients_answered: list[int]
    dropped: dict[int, str]
    mean_loss: float | None
    bytes_up: list[int]
    bytes_down: list[int]
    seconds: float
