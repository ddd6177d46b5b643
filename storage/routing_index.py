"""The routing index: one signature per served task, in a LanceDB table, searched by cosine.

A task's signature is derived from its run's global context vectors alone (nothing
else about the clients' data is stored or needed): the chosen layers' attention and
MLP vectors, each centred on the mean over the indexed tasks and scaled to unit
norm, concatenated. Centring matters: every context vector is dominated by what all
last-token activations share (the model's resting direction at a newline), so raw
vectors of different tasks are nearly parallel; what tells tasks apart is the rest.

A query is a prompt's block outputs at the same layers and the same kind of
position (the token that ends the text), centred on the same mean; its nearest
signature is the task it is routed to. The table is derived data: a server rebuilds
it whenever the set of served runs changes, in a directory of its own, so replicas
never contend with each other or with the federation driver for the run store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa

TABLE = "task_signatures"


def signature_layers(num_layers: int) -> list[int]:
    """The layers a signature reads: the last one.

    Measured with SmolLM2-135M on SST-2/Subj/AG News/TREC (bench/routing.py): context
    vectors route 58% of held-out texts right from the last layer, 50% from all layers,
    33% from the upper half, 30% from the middle one.
    """
    return [num_layers - 1]


def _centred_units(blocks: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``[N, K, d]`` block vectors -> ``[N, K*d]``: each of the K blocks centred, unit norm, concatenated."""
    centred = blocks - centre[None]
    norms = np.linalg.norm(centred, axis=-1, keepdims=True)
    return (centred / np.maximum(norms, 1e-12)).reshape(len(blocks), -1).astype(np.float32)


def blocks_at(vectors: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """``[L, 2, d]`` (or ``[N, L, 2, d]``) -> chosen layers' blocks ``[K, d]`` (``[N, K, d]``), K = 2·len(layers)."""
    picked = np.asarray(vectors, dtype=np.float64)[..., list(layers), :, :]
    return picked.reshape(*picked.shape[:-3], -1, picked.shape[-1])


@dataclass(frozen=True)
class Route:
    task: str
    run_id: str
    similarity: float  # cosine similarity between the query's and the task's signature, in [-1, 1]


class TaskSignatureIndex:
    """Signatures of the served runs in a LanceDB table; ``nearest`` routes queries."""

    def __init__(self, uri: str | Path, layers: Sequence[int]):
        self.db = lancedb.connect(str(uri))
        self.layers = list(layers)
        self.centre: np.ndarray | None = None  # [K, d] mean of the indexed tasks' blocks
        self.size = 0

    def rebuild(self, runs: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """Index ``(task, run_id, vectors [L, 2, d])`` for every served run, replacing what was there."""
        if not runs:
            self.size, self.centre = 0, None
            return
        blocks = np.stack([blocks_at(vectors, self.layers) for _, _, vectors in runs])  # [T, K, d]
        # With one task there is nothing to tell apart: keep raw directions (similarity stays meaningful).
        self.centre = blocks.mean(axis=0) if len(runs) > 1 else np.zeros(blocks.shape[1:])
        signatures = _centred_units(blocks, self.centre)  # [T, K*d]
        schema = pa.schema([
            pa.field("task", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), signatures.shape[1]), nullable=False),
        ])
        rows = [{"task": t, "run_id": r, "vector": s} for (t, r, _), s in zip(runs, signatures)]
        self.db.create_table(TABLE, pa.Table.from_pylist(rows, schema=schema), mode="overwrite")
        self.size = len(rows)

    def nearest(self, activations: np.ndarray) -> list[Route]:
        """Route each query: ``activations`` ``[N, L, 2, d]`` (block outputs at each text's end)."""
        if self.size == 0 or self.centre is None:
            raise LookupError("no task is indexed for routing")
        table = self.db.open_table(TABLE)
        queries = _centred_units(blocks_at(activations, self.layers), self.centre)  # [N, K*d]
        routes = []
        for query in queries:
            # Flat (exact) search: a handful of tasks needs no ANN index. LanceDB's cosine distance is
            # 1 - cos; the cosine of two concatenations of K unit blocks is the mean per-block cosine.
            hit = table.search(query).distance_type("cosine").limit(1).to_list()[0]
            routes.append(Route(hit["task"], hit["run_id"], 1.0 - float(hit["_distance"])))
        return routes
