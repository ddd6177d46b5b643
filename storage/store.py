"""The LanceDB store: tasks, runs, rounds, context vectors, coefficients, publications.

Every write appends a new version of a table (LanceDB tables are versioned
datasets). A run's rows are written while it is ``running`` and become loadable
only once the run row says ``complete``, so a reader never sees half a run.
The published run of a task is a tag that moves: the ``publication_log`` table is
its append-only log (publish pushes, rollback pops), which keeps the full
history of what was live when, for audit and rollback. Entry ``seq`` of a task
is written only if no entry ``seq`` exists yet, atomically, by LanceDB itself
(see :meth:`Store._append_publication`), so two processes publishing at once,
on one host or on two pods sharing an object store, never lose or duplicate an
entry, and "publish only if the live run is still X" is a real compare-and-set.
The federation driver, ``ifedicl publish``/``rollback`` and recalibration
write; servers and ``predict`` only read.

A run's status moves only from ``running``, once: to ``complete`` (its driver finished it) or to
``failed`` (its driver failed it, or the next driver reaped it as dead). Each move is a
compare-and-set (:meth:`Store._move_run`), so a reaper and a finishing driver racing cannot both
win, and a complete (perhaps published, already served) run is never marked failed afterwards.
A run row that cannot be read (corrupt JSON, an invalid task spec) is skipped and logged by the
listings servers read, so one bad row never hides the other tasks.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import BTree

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.model_fingerprint import ModelFingerprint
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage import schema
from ifedicl.storage.records import RoundRecord

log = logging.getLogger("ifedicl.storage")


class StoreError(IfediclError):
    """The store is missing, or a task/run/version in it is."""


class StoreUnavailable(StoreError):
    """A complete run's tables cannot be read *right now*: a table or data file missing or unreadable
    (a restore or a move in progress, an object store's hiccup). Unlike other store errors
    it says nothing about the run itself, so readers may retry it (a server does, with backoff)."""


class ModelMismatchError(IfediclError):
    """A stored run was made with another model than the one in use."""


class PublicationConflict(StoreError):
    """A conditional publish or rollback found another run live than the one it was conditioned on."""


class _AnyLive:
    """Type of :data:`ANY_LIVE`: ``None`` already means "no run is live", so "don't care" needs its own value."""

    def __repr__(self) -> str:
        return "ANY_LIVE"


ANY_LIVE = _AnyLive()

# A publish that loses seq N+1 re-reads the log and tries N+2: each loss means another entry
# landed, so this bounds a pathological stampede, not a slow store.
_PUBLISH_ATTEMPTS = 100
# Lance marks a column as the table's unenforced primary key with this field-metadata key.
_PRIMARY_KEY_MARK = b"lance-schema:unenforced-primary-key"


def _now() -> datetime:
    return datetime.now(UTC)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass
class RunInfo:
    """A complete run without its tables: what a server lists, routes to and checks before loading."""

    run_id: str
    task: TaskSpec
    fingerprint: ModelFingerprint
    created_at: datetime
    settings: dict
    summary: dict


@dataclass
class StoredRun:
    """A complete run, ready to inject: what serving and ``predict`` load."""

    run_id: str
    task: TaskSpec
    fingerprint: ModelFingerprint
    vectors: np.ndarray  # [L, 2, d] float32
    coefficients: np.ndarray  # [L, 2, 2] float32 (final round)
    round: int
    created_at: datetime
    settings: dict
    summary: dict


# Tables whose lookups go by run: indexed on ``run_id`` by :meth:`Store.optimize`.
_RUN_KEYED = ("runs", "rounds", "coefficients", "server_state")


class Store:
    """A LanceDB database holding every run's vectors and coefficients."""

    def __init__(self, uri: str | Path, create: bool = False):
        self.uri = str(uri)
        self.require_present(create=create)
        try:
            self.db = lancedb.connect(self.uri)
        except Exception as err:
            raise StoreError(f"cannot open store {self.uri}: {err}") from None

    def require_present(self, create: bool = False) -> None:
        """Raise :class:`StoreError` unless a local store's directory is there (``create``: or can be made).

        Called again after a read that must not mistake a vanished store for an empty one: LanceDB lists
        a local store whose directory was moved away mid-read as a database with no tables.
        """
        local = _local_path(self.uri)
        if local is not None and local.exists() and not local.is_dir():
            raise StoreError(f"store {self.uri} is a file, not a store directory (nothing was read or written)")
        if local is not None and not create and not local.is_dir():
            raise StoreError(f"store {self.uri} does not exist (run `ifedicl federate --store {self.uri}` first)")

    # ------------------------------------------------------------------ tables
    def _table_names(self) -> set[str]:
        return set(self.db.list_tables().tables)

    def _table(self, name: str, table_schema: pa.Schema | None = None):
        if name in self._table_names():
            return self.db.open_table(name)
        if table_schema is None:
            return None
        return self.db.create_table(name, schema=table_schema, exist_ok=True)

    def _rows(self, name: str, where: str | None = None) -> list[dict]:
        table = self._table(name)
        if table is None:
            return []
        query = table.search()
        if where:
            query = query.where(where)
        return query.limit(None).to_arrow().to_pylist()

    def _require_table(self, name: str) -> None:
        """A table every complete run has rows in: its absence is the store's state now, not the run's."""
        if name not in self._table_names():
            raise StoreUnavailable(f"table {name} is missing from store {self.uri} (moved or being restored?)")

    def _append(self, name: str, table_schema: pa.Schema, rows: list[dict]) -> None:
        self._table(name, table_schema).add(pa.Table.from_pylist(rows, schema=table_schema))

    # ------------------------------------------------------------------ writes (driver only)
    def start_run(self, task: TaskSpec, fp: ModelFingerprint, settings: dict, code_version: str = "") -> str:
        run_id = f"{task.name}-{_now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        task_row = {"task": task.name, "template": task.template, "labels": list(task.labels), "updated_at": _now()}
        upsert = self._table("tasks", schema.TASKS).merge_insert("task")
        upsert.when_matched_update_all().when_not_matched_insert_all().execute(
            pa.Table.from_pylist([task_row], schema=schema.TASKS)
        )
        self._append(
            "runs",
            schema.RUNS,
            [
                {
                    "run_id": run_id,
                    "task": task.name,
                    "task_spec": json.dumps(task.to_dict()),
                    "status": "running",
                    "created_at": _now(),
                    "finished_at": None,
                    "model_id": fp.model_id,
                    "num_layers": fp.num_layers,
                    "hidden_size": fp.hidden_size,
                    "config_hash": fp.config_hash,
                    "settings": json.dumps(settings, sort_keys=True, default=str),
                    "summary": None,
                    "error": None,
                    "code_version": code_version,
                }
            ],
        )
        return run_id

    def record_round(self, run_id: str, record: RoundRecord) -> None:
        row = {
            "run_id": run_id,
            "round": record.round,
            "clients_sampled": record.clients_sampled,
            "clients_answered": record.clients_answered,
            "dropped": json.dumps({str(k): v for k, v in record.dropped.items()}),
            "mean_loss": record.mean_loss,
            "bytes_up": record.bytes_up,
            "bytes_down": record.bytes_down,
            "seconds": record.seconds,
            "at": _now(),
        }
        self._append("rounds", schema.ROUNDS, [row])

    def write_vectors(self, run_id: str, task: str, vectors: np.ndarray) -> None:
        """Store ``[L, 2, d]`` float32 context vectors bit-exactly."""
        vectors = np.asarray(vectors, dtype=np.float32)
        num_layers, _, hidden = vectors.shape
        rows = [
            {"run_id": run_id, "task": task, "layer": layer, "block": name, "vector": vectors[layer, block]}
            for layer in range(num_layers)
            for block, name in enumerate(schema.BLOCKS)
        ]
        table_schema = schema.vectors_schema(hidden)
        self._table(schema.vectors_table_name(hidden), table_schema).add(
            pa.Table.from_pylist(rows, schema=table_schema)
        )

    def write_coefficients(self, run_id: str, task: str, round_index: int, coefficients: np.ndarray) -> None:
        coefficients = np.asarray(coefficients, dtype=np.float32)
        row = {
            "run_id": run_id,
            "task": task,
            "round": round_index,
            "num_layers": coefficients.shape[0],
            "values": coefficients.reshape(-1),
        }
        self._append("coefficients", schema.COEFFICIENTS, [row])

    def write_server_state(self, run_id: str, round_index: int, state: dict[str, np.ndarray]) -> None:
        """The server optimizer's state after ``round_index`` (its fields as arrays): a warm start continues it."""
        rows = [
            {
                "run_id": run_id,
                "round": round_index,
                "name": name,
                "shape": list(np.shape(value)),
                "values": np.asarray(value, dtype=np.float64).reshape(-1),
            }
            for name, value in sorted(state.items())
        ]
        self._append("server_state", schema.SERVER_STATE, rows)

    def server_state(self, run_id: str, round_index: int | None = None) -> tuple[int, dict[str, np.ndarray]] | None:
        """The run's server optimizer state after ``round_index`` (None: its last) -> (round, {field: array}),
        or None if it kept none."""
        states = self.server_states(run_id)
        chosen = max(states, default=None) if round_index is None else round_index
        return (chosen, states[chosen]) if chosen in states else None

    def server_states(self, run_id: str) -> dict[int, dict[str, np.ndarray]]:
        """Every round's stored server optimizer state of the run: {round: {field: array}} ({} if it kept none)."""
        states: dict[int, dict[str, np.ndarray]] = {}
        for row in self._rows("server_state", f"run_id = {_quote(run_id)}"):
            value = np.asarray(row["values"], dtype=np.float64).reshape(row["shape"])
            states.setdefault(row["round"], {})[row["name"]] = value
        return states

    def _move_run(self, run_id: str, values: dict) -> tuple[bool, str]:
        """Apply ``values`` (a new status and what goes with it) only if the run is ``running``, atomically.

        -> (moved, the status the run has now). One ``merge_insert`` on ``run_id`` whose update is
        conditioned on ``target.status = 'running'``: Lance commits it against the table version it
        read, and a commit racing another update of the same row conflicts and is re-run on the newer
        version, where the condition no longer holds, so it updates nothing. Measured (lancedb 0.40, two
        processes moving the same 30 runs, one to ``complete``, the other to ``failed``, released
        together per run): every run moved exactly once and holds the winner's values.
        """
        row = self.run_row(run_id)
        if row["status"] != "running":
            return False, row["status"]
        table = self._table("runs")
        data = pa.Table.from_pylist([{**row, **values}], schema=schema.RUNS)
        result = table.merge_insert("run_id").when_matched_update_all(where="target.status = 'running'").execute(data)
        if result.num_updated_rows:
            return True, values["status"]
        return False, self.run_row(run_id)["status"]

    def finish_run(self, run_id: str, summary: dict) -> None:
        """``running`` -> ``complete``. StoreError if the run is no longer running (it was reaped or failed
        meanwhile): a run another process gave up on must not become loadable behind its back."""
        summary_json = json.dumps(summary, default=str)
        moved, status = self._move_run(run_id, {"status": "complete", "finished_at": _now(), "summary": summary_json})
        if not moved:
            row = self.run_row(run_id)
            raise StoreError(
                f"run {run_id} is {status}, not running, so it was not marked complete"
                + (f" (error: {row['error']})" if row.get("error") else "")
            )

    def fail_run(self, run_id: str, error: str) -> bool:
        """``running`` -> ``failed``; True if this call failed it. A run already ``complete`` (perhaps published and
        served) or ``failed`` is left as it is: False, and the refusal is logged, never an overwrite."""
        moved, status = self._move_run(run_id, {"status": "failed", "finished_at": _now(), "error": error})
        if not moved:
            log.warning("run %s is %s: not marked failed (%s)", run_id, status, error)
        return moved

    # ------------------------------------------------------------------ publication tag
    def publication_log(self, task: str | None = None) -> list[dict]:
        """Every publish/rollback entry (``task, seq, action, run_id, at``), per task in ``seq`` order."""
        names = self._table_names()
        if schema.PUBLICATION_LOG in names:
            name = schema.PUBLICATION_LOG
        elif schema.LEGACY_PUBLICATIONS in names:
            name = schema.LEGACY_PUBLICATIONS
        else:
            return []
        rows = self._rows(name, f"task = {_quote(task)}" if task else None)
        return sorted(rows, key=lambda r: (r["task"], r["seq"]))

    def _publication_stacks(self, task: str | None = None) -> dict[str, list[str]]:
        return _replay(self.publication_log(task))

    def _publication_stack(self, task: str) -> list[str]:
        return self._publication_stacks(task).get(task, [])

    def _publication_log_for_write(self):
        """The log table, created keyed (see ``schema.PUBLICATIONS``) and filled from a legacy store as needed.

        Both steps are safe to race: ``create_table(exist_ok=True)`` with one schema, and the
        legacy import, which is itself an insert-if-not-exists by key.
        """
        legacy_exists = schema.LEGACY_PUBLICATIONS in self._table_names()
        table = self.db.create_table(schema.PUBLICATION_LOG, schema=schema.PUBLICATIONS, exist_ok=True)
        if not _is_primary_key(table.schema, schema.PUBLICATION_KEY):  # the one guarantee publishing rests on
            raise StoreError(
                f"table {schema.PUBLICATION_LOG} in {self.uri} has no primary key {schema.PUBLICATION_KEY!r}"
            )
        if legacy_exists and table.count_rows() == 0:
            legacy = self._rows(schema.LEGACY_PUBLICATIONS)
            if legacy:
                rows = [{**row, "key": schema.publication_key(row["task"], row["seq"])} for row in legacy]
                _insert_if_absent(table, rows)
        return table

    def _append_publication(self, task: str, decide: Callable[[list[str]], tuple[str, str]]) -> str:
        """Append ``task``'s next log entry, deciding it from the stack it will sit on; return its run.

        The entry is written by ``merge_insert`` on ``key`` = (task, seq) with insert-if-not-exists.
        With ``key`` the table's (unenforced) primary key, Lance records the inserted keys in the
        commit and a commit that races another inserting the same key conflicts; Lance then re-runs
        the merge on the newer version, where the key exists, so it inserts nothing. Measured
        (lancedb 0.40, two processes appending 30 entries each to one task): 60 unique seqs with the
        key, 34 unique of 60 rows without it. The commit itself is the manifest's atomic
        put-if-not-exists, the same on a local directory and an object store. So if nothing was
        inserted, someone else took ``seq``: re-read the log, decide again (a rollback or a
        conditional publish must be judged against what is live *now*), and try the next seq.
        """
        table = self._publication_log_for_write()
        for _ in range(_PUBLISH_ATTEMPTS):
            entries = self.publication_log(task)
            run_id, action = decide(_replay(entries).get(task, []))
            seq = max((entry["seq"] for entry in entries), default=0) + 1
            row = {"task": task, "run_id": run_id, "action": action, "seq": seq, "at": _now()}
            if _insert_if_absent(table, [{**row, "key": schema.publication_key(task, seq)}]):
                return run_id
        raise StoreError(f"could not append to the publication log of task {task!r}: {_PUBLISH_ATTEMPTS} seqs taken")

    def publish(self, run_id: str, expect_live: str | None | _AnyLive = ANY_LIVE) -> str:
        """Make ``run_id`` its task's live run; return the task.

        ``expect_live``: publish only if this run (``None``: no run) is live when the entry is
        committed, else raise :class:`PublicationConflict` and publish nothing.
        """
        run = self.run_row(run_id)
        if run["status"] != "complete":
            raise StoreError(f"run {run_id} is {run['status']}; only complete runs can be published")
        task = run["task"]

        def decide(stack: list[str]) -> tuple[str, str]:
            _check_live(task, stack, expect_live)
            return run_id, "publish"

        self._append_publication(task, decide)
        return task

    def rollback(self, task: str, expect_live: str | None | _AnyLive = ANY_LIVE) -> str:
        """Move ``task``'s tag back to the run published before the current one; return that run.

        ``expect_live`` as for :meth:`publish`: roll back only if that run is still the live one.
        """

        def decide(stack: list[str]) -> tuple[str, str]:
            _check_live(task, stack, expect_live)
            if len(stack) < 2:
                raise StoreError(f"task {task} has no earlier published run to roll back to")
            return stack[-2], "rollback"

        return self._append_publication(task, decide)

    # ------------------------------------------------------------------ recalibration attempts
    def record_recalibration(self, row: dict) -> None:
        """Append one recalibration attempt (a plain append: attempts never contend for a key)."""
        self._append("recalibrations", schema.RECALIBRATIONS, [row])

    def recalibrations(self, task: str | None = None) -> list[dict]:
        """Every recorded recalibration attempt, oldest first, optionally of one task."""
        rows = self._rows("recalibrations", f"task = {_quote(task)}" if task else None)
        return sorted(rows, key=lambda r: r["started_at"])

    # ------------------------------------------------------------------ reads
    def published_run_id(self, task: str) -> str | None:
        stack = self._publication_stack(task)
        return stack[-1] if stack else None

    def published(self) -> dict[str, str]:
        """``{task: published run id}`` for every task with a published run (one scan of the log)."""
        return {task: stack[-1] for task, stack in sorted(self._publication_stacks().items()) if stack}

    def published_runs(self) -> dict[str, RunInfo]:
        """``{task: its published run}`` without tables: two scans, whatever the number of tasks."""
        published = self.published()
        if not published:
            return {}
        ids = ", ".join(_quote(run_id) for run_id in published.values())
        rows = {row["run_id"]: row for row in self._rows("runs", f"run_id IN ({ids})")}
        out = {}
        for task, run_id in published.items():
            if run_id not in rows:
                log.error(
                    "store %s: task %s publishes run %s, which has no run row: task skipped", self.uri, task, run_id
                )
                continue
            try:
                out[task] = _run_info(rows[run_id])
            except Exception as err:  # one corrupt row must not hide every other task
                log.error("store %s: run %s of task %s cannot be read (%s: %s): task skipped",
                          self.uri, run_id, task, type(err).__name__, err)  # fmt: skip
        return out

    def runs(self, task: str | None = None) -> list[dict]:
        rows = self._rows("runs", f"task = {_quote(task)}" if task else None)
        return sorted(rows, key=lambda r: r["created_at"])

    def run_row(self, run_id: str) -> dict:
        rows = self._rows("runs", f"run_id = {_quote(run_id)}")
        if not rows:
            raise StoreError(f"no run {run_id!r} in store {self.uri}")
        return rows[0]

    def rounds(self, run_id: str) -> list[dict]:
        return sorted(self._rows("rounds", f"run_id = {_quote(run_id)}"), key=lambda r: (r["round"], r["at"]))

    def coefficients_by_round(self, run_id: str) -> dict[int, np.ndarray]:
        out = {}
        for row in self._rows("coefficients", f"run_id = {_quote(run_id)}"):
            out[row["round"]] = np.asarray(row["values"], dtype=np.float32).reshape(row["num_layers"], 2, 2)
        return out

    def load_run(self, task: str, run_id: str | None = None, expect: ModelFingerprint | None = None) -> StoredRun:
        """Load ``task``'s published run (or ``run_id``), checked against the model in use."""
        if run_id is None:
            run_id = self.published_run_id(task)
            if run_id is None:
                known = sorted(self.published())
                raise StoreError(f"task {task!r} has no published run in {self.uri} (published: {known or 'none'})")
        row = self.run_row(run_id)
        if row["task"] != task:
            raise StoreError(f"run {run_id} belongs to task {row['task']!r}, not {task!r}")
        if row["status"] != "complete":
            raise StoreError(f"run {run_id} is {row['status']}, not complete")
        info = _run_info(row)
        if expect is not None:
            check_fingerprint(run_id, info.fingerprint, expect)
        return self.load_tables(info)

    def load_tables(self, info: RunInfo) -> StoredRun:
        """``info``'s context vectors and final coefficients: two indexed lookups (a server's cache miss).

        :class:`StoreUnavailable` if a table or file cannot be read now (may pass); :class:`StoreError`
        if the tables are there but the run's rows are not all in them (will not pass: a complete run's
        rows never change).
        """
        fp = info.fingerprint
        try:
            self._require_table("coefficients")
            vectors = self.vectors_of([info.run_id], fp.num_layers, fp.hidden_size)[info.run_id]
            by_round = self.coefficients_by_round(info.run_id)
        except (OSError, RuntimeError) as err:  # Lance's IO errors (a data file gone) are RuntimeErrors
            message = str(err).split(", /rustc", 1)[0][:300]
            raise StoreUnavailable(f"run {info.run_id}: its tables cannot be read now: {message}") from None
        if not by_round:
            raise StoreError(f"run {info.run_id} has no coefficients")
        last = max(by_round)
        return StoredRun(
            run_id=info.run_id,
            task=info.task,
            fingerprint=fp,
            vectors=vectors,
            coefficients=by_round[last],
            round=last,
            created_at=info.created_at,
            settings=info.settings,
            summary=info.summary,
        )

    def vectors_of(self, run_ids: list[str], num_layers: int, hidden_size: int) -> dict[str, np.ndarray]:
        """``{run_id: [L, 2, d] float32}`` for runs made on an (L, d) model, in one query."""
        if not run_ids:
            return {}
        self._require_table(schema.vectors_table_name(hidden_size))
        ids = ", ".join(_quote(run_id) for run_id in run_ids)
        out = {run_id: np.zeros((num_layers, 2, hidden_size), dtype=np.float32) for run_id in run_ids}
        found = dict.fromkeys(run_ids, 0)
        for r in self._rows(schema.vectors_table_name(hidden_size), f"run_id IN ({ids})"):
            out[r["run_id"]][r["layer"], schema.BLOCKS.index(r["block"])] = np.asarray(r["vector"], dtype=np.float32)
            found[r["run_id"]] += 1
        for run_id, count in found.items():
            if count != num_layers * 2:
                raise StoreError(f"run {run_id} has {count} vector rows, expected {num_layers * 2}")
        return out

    # ------------------------------------------------------------------ maintenance
    def optimize(self) -> None:
        """Compact every table and index its ``run_id``, so lookups stay fast as runs pile up.

        Each run appends a few rows to each table, one small file per append; with
        1,000 published runs a run's load opened thousands of files (0.3-0.5 s
        measured; 10-20 ms after compaction and the index). Readers are never
        disturbed: compaction commits a new version with the same rows.
        """
        for name in sorted(self._table_names()):
            table = self.db.open_table(name)
            if name in _RUN_KEYED or name.startswith(schema.VECTORS_TABLE_PREFIX):
                indexed = {column for index in table.list_indices() for column in index.columns}
                if "run_id" not in indexed and table.count_rows() > 0:
                    table.create_index("run_id", config=BTree())
            table.optimize()


def _local_path(uri: str) -> Path | None:
    """The directory of a local store URI; ``None`` for an object store (s3://, gs://, memory://, ...)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)


def _replay(entries: list[dict]) -> dict[str, list[str]]:
    """``{task: stack of published runs}``: publish pushes a run, rollback pops back to the one before."""
    stacks: dict[str, list[str]] = {}
    for entry in sorted(entries, key=lambda e: (e["task"], e["seq"])):
        stack = stacks.setdefault(entry["task"], [])
        if entry["action"] == "publish":
            stack.append(entry["run_id"])
        elif stack:
            stack.pop()
    return stacks


def _check_live(task: str, stack: list[str], expect_live: str | None | _AnyLive) -> None:
    live = stack[-1] if stack else None
    if expect_live is not ANY_LIVE and live != expect_live:
        raise PublicationConflict(f"task {task}: the live run is {live}, not {expect_live}; nothing was changed")


def _is_primary_key(table_schema: pa.Schema, column: str) -> bool:
    metadata = table_schema.field(column).metadata or {}
    return any(key.startswith(_PRIMARY_KEY_MARK) for key in metadata)


def _insert_if_absent(table, rows: list[dict]) -> int:
    """Insert the rows whose ``key`` is not in ``table`` yet, atomically; return how many were."""
    data = pa.Table.from_pylist(rows, schema=schema.PUBLICATIONS)
    result = table.merge_insert(schema.PUBLICATION_KEY).when_not_matched_insert_all().execute(data)
    return result.num_inserted_rows


def _run_info(row: dict) -> RunInfo:
    return RunInfo(
        run_id=row["run_id"],
        task=TaskSpec.from_dict(json.loads(row["task_spec"])),
        fingerprint=ModelFingerprint(row["model_id"], row["num_layers"], row["hidden_size"], row["config_hash"]),
        created_at=row["created_at"],
        settings=json.loads(row["settings"]),
        summary=json.loads(row["summary"] or "{}"),
    )


def check_fingerprint(run_id: str, stored: ModelFingerprint, in_use: ModelFingerprint) -> None:
    diffs = [
        f"{field}: run has {getattr(stored, field)!r}, model in use has {getattr(in_use, field)!r}"
        for field in ("model_id", "num_layers", "hidden_size", "config_hash")
        if getattr(stored, field) != getattr(in_use, field)
    ]
    if diffs:
        raise ModelMismatchError(f"run {run_id} was made with another model ({'; '.join(diffs)})")
