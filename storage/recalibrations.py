"""The ``recalibrations`` table: one row per ``ifedicl recalibrate`` attempt.

Append-only, like the rest of the store, so it doubles as an audit log and as
the source of the ``ifedicl_recalibration_*`` metrics (counters stay monotonic
because rows are never removed). Written only by the recalibration job.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from ifedicl.storage.store import Store

TABLE = "recalibrations"
TIMESTAMP = pa.timestamp("us", tz="UTC")

# published: candidate became live | kept_live: candidate worse than live by more than the margin
# failed: the attempt raised (federation, evaluation, store) | busy: another attempt held the task's lock
DECISIONS = ("published", "kept_live", "failed", "busy")

SCHEMA = pa.schema(
    [
        pa.field("attempt_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # full | stage2
        pa.field("decision", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("started_at", TIMESTAMP, nullable=False),
        pa.field("finished_at", TIMESTAMP, nullable=False),
        pa.field("candidate_run_id", pa.string()),
        pa.field("live_run_id", pa.string()),  # the live run the candidate was compared with
        pa.field("candidate_accuracy", pa.float64()),
        pa.field("live_accuracy", pa.float64()),
        pa.field("zero_shot_accuracy", pa.float64()),
        pa.field("eval_examples", pa.int64()),
        pa.field("margin", pa.float64(), nullable=False),
        pa.field("metrics", pa.string(), nullable=False),  # JSON: everything else measured
    ]
)


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
    data = pa.Table.from_pylist([row], schema=SCHEMA)
    if TABLE in set(store.db.list_tables().tables):
        store.db.open_table(TABLE).add(data)
    else:
        store.db.create_table(TABLE, schema=SCHEMA, exist_ok=True).add(data)


def attempts(store: Store, task: str | None = None) -> list[dict]:
    """Every recorded attempt (oldest first), optionally for one task."""
    if TABLE not in set(store.db.list_tables().tables):
        return []
    query = store.db.open_table(TABLE).search()
    if task is not None:
        query = query.where("task = '" + task.replace("'", "''") + "'")
    rows = query.limit(None).to_arrow().to_pylist()
    return sorted(rows, key=lambda r: r["started_at"])
