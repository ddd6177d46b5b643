"""Recalibration attempts: one row per ``ifedicl recalibrate`` attempt in the store's ``recalibrations`` table.

Append-only, like the rest of the store, so it doubles as an audit log and as
the source of the ``ifedicl_recalibration_*`` metrics (counters stay monotonic
because rows are never removed). Written only by the recalibration job.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from ifedicl.storage.store import Store

# published: candidate became live | kept_live: candidate worse than live by more than the margin
# failed: the attempt raised (federation, evaluation, store; also a live run that changed meanwhile)
# busy: another attempt held the task's lock
DECISIONS = ("published", "kept_live", "failed", "busy")


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Attempt:
    attempt_id: str
    task: str
    mode: str
    margin: float
    started_at: datetime = field(default_factory=now)
    decision: str = "failed"
    reason: str = ""
    finished_at: datetime | None = None
    candidate_run_id: str | None = None
    live_run_id: str | None = None
    candidate_accuracy: float | None = None
    live_accuracy: float | None = None
    zero_shot_accuracy: float | None = None
    eval_examples: int | None = None
    metrics: dict = field(default_factory=dict)


def record_attempt(store: Store, attempt: Attempt) -> None:
    if attempt.decision not in DECISIONS:
        raise ValueError(f"unknown decision {attempt.decision!r}")
    row = asdict(attempt)
    row["finished_at"] = attempt.finished_at or now()
    row["metrics"] = json.dumps(attempt.metrics, sort_keys=True, default=str)
    store.record_recalibration(row)


def attempts(store: Store, task: str | None = None) -> list[dict]:
    """Every recorded attempt (oldest first), optionally for one task."""
    return store.recalibrations(task)
