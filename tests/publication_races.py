"""Helpers for the publication race tests: complete runs to publish, and the racing workers.

Workers are module-level so ``multiprocessing``'s spawn start method (the safe one with
LanceDB's runtime; fork can deadlock it) can import them in the child processes.
"""

from __future__ import annotations

import numpy as np

from ifedicl.kernel.modeling import ModelFingerprint
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage.store import PublicationConflict, Store

TASK = TaskSpec("t1", "Q: {text}\nA:", ("no", "yes"))
FP = ModelFingerprint("/models/tiny", 2, 8, "abc123")


def complete_run(store: Store, seed: int, task: TaskSpec = TASK) -> str:
    """A complete (publishable) run with tiny random tables."""
    rng = np.random.default_rng(seed)
    run_id = store.start_run(task, FP, {"seed": seed})
    store.write_vectors(run_id, task.name, rng.normal(size=(2, 2, 8)).astype(np.float32))
    store.write_coefficients(run_id, task.name, 1, rng.normal(size=(2, 2, 2)).astype(np.float32))
    store.finish_run(run_id, {"accuracy": 0.5})
    return run_id


def publish_rollback_pairs(store: Store | str, run_id: str, pairs: int, barrier, results) -> None:
    """Publish ``run_id`` then roll the task back, ``pairs`` times; report every call's result."""
    store = Store(store) if isinstance(store, str) else store
    done = []
    barrier.wait()
    for _ in range(pairs):
        store.publish(run_id)
        done.append(("publish", run_id))
        done.append(("rollback", store.rollback(TASK.name)))
    results.put((run_id, done))


def conditional_publishes(store: Store | str, run_ids: list[str], barrier, results) -> None:
    """Each round: read the live run, wait for the other racer, publish a new run only if the live one is unchanged.

    A new run each round, so that a winner's publish always changes the live run (re-publishing
    the live run would leave it unchanged, and rightly let the other racer's condition hold).
    """
    store = Store(store) if isinstance(store, str) else store
    outcomes = []
    for run_id in run_ids:
        barrier.wait()  # the previous round is over: both racers read the same live run
        live = store.published_run_id(TASK.name)
        barrier.wait()
        try:
            store.publish(run_id, expect_live=live)
            outcomes.append(("won", live))
        except PublicationConflict:
            outcomes.append(("lost", live))
    results.put((run_ids[0], outcomes))
