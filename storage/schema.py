"""Arrow schemas of the store's tables.

Context vectors are fixed-size float32 lists, so their width is part of the
schema: they live in one table per hidden size (``context_vectors_d{d}``).
Coefficients are Λ flattened from ``[L, 2, 2]`` (layer, block attn/mlp, λ/β).
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

# The ``block`` column's words, in the order of a vector's block axis (``[L, 2, d]``: attn = 0, mlp = 1), as
# model_patches.injection's ATTN/MLP index it; spelled here so that the store imports no torch (a test checks
# that the two agree).
BLOCKS = ("attn", "mlp")

TASKS = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("template", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.string()), nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ]
)

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("task_spec", pa.string(), nullable=False),  # JSON of the TaskSpec used
        pa.field("status", pa.string(), nullable=False),  # running | complete | failed
        pa.field("created_at", TIMESTAMP, nullable=False),
        pa.field("finished_at", TIMESTAMP),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("num_layers", pa.int32(), nullable=False),
        pa.field("hidden_size", pa.int32(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("settings", pa.string(), nullable=False),  # JSON
        pa.field("summary", pa.string()),  # JSON: accuracy, bytes, timings
        pa.field("error", pa.string()),
        pa.field("code_version", pa.string()),
    ]
)

ROUNDS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),  # 0 = stage 1 (vectors)
        pa.field("clients_sampled", pa.list_(pa.int32()), nullable=False),
        pa.field("clients_answered", pa.list_(pa.int32()), nullable=False),
        pa.field("dropped", pa.string(), nullable=False),  # JSON {client: reason}
        pa.field("mean_loss", pa.float64()),
        pa.field("bytes_up", pa.list_(pa.int64()), nullable=False),  # per answered client
        pa.field("bytes_down", pa.list_(pa.int64()), nullable=False),  # per sampled client
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("at", TIMESTAMP, nullable=False),
    ]
)

COEFFICIENTS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("num_layers", pa.int32(), nullable=False),
        pa.field("values", pa.list_(pa.float32()), nullable=False),  # [L, 2, 2] flattened
    ]
)

# The server optimizer's state after each round of a run (federation_job/server_optimizer.py): one row per
# (round, field), each field a float64 array shaped like Λ (or the step count), so that a recalibration
# warm-started from the run continues its optimizer. Absent for runs whose server step keeps no state.
SERVER_STATE = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("values", pa.list_(pa.float64()), nullable=False),
    ]
)

# The publication log: one row per publish or rollback, ``seq`` counting 1, 2, 3, ... per task.
# ``key`` ("<task>#<seq>") is the table's unenforced primary key, declared in the schema so the
# table never exists without it: Lance then records the keys a merge_insert inserts and fails (and
# retries) a commit that races another inserting the same key, which is what makes "append entry
# seq N+1 unless someone already did" atomic across processes. (The metadata is what
# ``Table.set_unenforced_primary_key`` writes; compound keys are not supported, hence one column.)
PUBLICATION_LOG = "publication_log"
PUBLICATION_KEY = "key"
PRIMARY_KEY_METADATA = {"lance-schema:unenforced-primary-key:position": "1"}
PUBLICATIONS = pa.schema(
    [
        pa.field(PUBLICATION_KEY, pa.string(), nullable=False, metadata=PRIMARY_KEY_METADATA),
        pa.field("task", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),  # publish | rollback
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("at", TIMESTAMP, nullable=False),
    ]
)
# Stores written before the log had a key keep their entries in this table (global ``seq``,
# no key); the first write to such a store copies them into the log, idempotently.
LEGACY_PUBLICATIONS = "publications"


def publication_key(task: str, seq: int) -> str:
    """Unique per (task, seq): ``seq`` has no ``#``, so the last ``#`` separates the two."""
    return f"{task}#{seq}"


RECALIBRATIONS = pa.schema(
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


def vectors_schema(hidden_size: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("task", pa.string(), nullable=False),
            pa.field("layer", pa.int32(), nullable=False),
            pa.field("block", pa.string(), nullable=False),  # attn | mlp
            pa.field("vector", pa.list_(pa.float32(), hidden_size), nullable=False),
        ]
    )


VECTORS_TABLE_PREFIX = "context_vectors_d"


def vectors_table_name(hidden_size: int) -> str:
    return f"{VECTORS_TABLE_PREFIX}{hidden_size}"
