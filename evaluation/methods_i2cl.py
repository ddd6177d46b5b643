"""Context-vector methods: I2CL centralized, local-only calibration, and IFed-ICL on Ray.

Budget parity: centralized and local-only calibration run ``rounds × local_epochs``
epochs, the same number of passes over each example a federated client makes.
IFed-ICL is the real :class:`Federation` (Ray actors, wire bytes, LanceDB store);
its Λ after every round is read back from the store and scored on the test set, and
its client time is what the actors measured (:func:`.context.federated_compute`).
Every method trains with ``settings.objective_for(method)``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import numpy as np

from ifedicl.evaluation.context import (
    MethodContext,
    federated_cell,
    federation_settings,
    no_communication,
)
from ifedicl.evaluation.per_client import client_test_indices, per_client_cell
from ifedicl.evaluation.scoring import score
from ifedicl.evaluation.settings import Cell, rounds_to_score, scored_rounds
from ifedicl.evaluation.tasks import PreparedTask
from ifedicl.federation_job.class_balanced import pooled_mean
from ifedicl.federation_job.client import Client
from ifedicl.model_patches.injection import initial_coefficients

log = logging.getLogger("ifedicl.eval")


def _calibrate_alone(
    mc: MethodContext, task: PreparedTask, data, seed: int, objective: str
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One party with ``data``: extract its vectors, calibrate Λ from the initial values; timed (wall and CPU)."""
    s = mc.settings
    start, cpu = time.monotonic(), time.process_time()
    client = Client(mc.ctx, mc.tokenizer, task.spec, data)
    limit = s.recipe.get("stage1_examples")
    if s.federation.get("stage1") == "class-balanced":  # the federation's estimator, for one party: fair parity
        vectors = pooled_mean([client.extract_class_means(batch_size=8, max_examples=limit)])
    else:
        vectors = client.extract_vectors(batch_size=8, max_examples=limit)
    init = initial_coefficients(mc.ctx.num_layers).numpy()
    # one party, one local run: one schedule over all its epochs whatever the recipe's schedule
    config = replace(s.calibration("i2cl_central", epochs=s.rounds * s.local_epochs), objective=objective)
    result = client.calibrate(vectors, init, config, seed)
    info = {
        "seconds": time.monotonic() - start,
        "cpu_seconds": time.process_time() - cpu,
        "steps": result.steps,
        "mean_loss": result.mean_loss,
        "objective": objective,
    }
    return vectors, result.coefficients, info


def i2cl_central(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    """All training data in one place: the upper bound the federation should approach."""
    objective = mc.settings.objective_for(cell.method)
    vectors, coeffs, info = _calibrate_alone(mc, task, task.data.train, cell.seed, objective)
    result = score(mc.ctx, mc.tokenizer, task.spec, task.test, None, vectors, coeffs, mc.settings.batch_size)
    return {
        **result,
        "objective": objective,
        "client_seconds": info["seconds"],
        "client_cpu_seconds": info["cpu_seconds"],
        "calibration": info,
        "coefficients": coeffs.tolist(),
        "comm": no_communication(),
    }


def local_calibration(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    """Each client's own vectors and Λ, no federation (the paper's global-vs-local comparison)."""
    s = mc.settings
    objective = s.objective_for(cell.method)
    slices = client_test_indices(task.test, s.clients, s.client_test)
    per_client, local_coeffs = [], []
    for cid, shard in enumerate(task.shards(s.clients, cell.alpha, cell.seed, s.min_shard)):
        vectors, coeffs, info = _calibrate_alone(mc, task, shard, cell.seed * 1000 + cid, objective)
        test = task.test.subset(slices[cid])
        result = score(mc.ctx, mc.tokenizer, task.spec, test, None, vectors, coeffs, s.batch_size, True)
        timing = {"seconds": info["seconds"], "cpu_seconds": info["cpu_seconds"]}
        per_client.append({"client": cid, "examples": len(shard), **timing, **result})
        local_coeffs.append(coeffs.tolist())
    return {
        **per_client_cell(per_client, task.test, slices, len(task.spec.labels)),
        "objective": objective,
        "client_seconds": float(np.mean([c["seconds"] for c in per_client])),
        "client_cpu_seconds": float(np.mean([c["cpu_seconds"] for c in per_client])),
        "coefficients_per_client": local_coeffs,
        "comm": no_communication(),
    }


# A recalibration trains on a new split of the clients' data: the federation's seed plus this.
RESPLIT_SEED_OFFSET = 1000


# The live federation a recalibration cell follows, kept for the next cell of the same federation: the warm
# and the cold cell of a seed recalibrate from one live run (an A/B from one start, and computed once, not twice).
_LIVE_RUN: dict[str, tuple[object, dict]] = {}


def ifedicl(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    """The real Ray federation, then accuracy of the global Λ after every round (round 0 = initial Λ).

    With ``recipe["recalibrate"]`` the cell is the scheduled recalibration that follows: see :func:`_recalibrated`.
    """
    start = mc.settings.recipe.get("recalibrate")
    if not start:
        return _federate(mc, task, cell)[1]
    settings = federation_settings(mc, cell)
    key = json.dumps([mc.model_id, str(task.source), settings.to_dict()], sort_keys=True, default=str)
    if key not in _LIVE_RUN:
        _LIVE_RUN.clear()
        _LIVE_RUN[key] = _federate(mc, task, cell)
    live, live_record = _LIVE_RUN[key]
    return _recalibrated(mc, task, cell, live, live_record, start)


def _federate(mc: MethodContext, task: PreparedTask, cell: Cell) -> tuple[object, dict]:
    """One IFed-ICL federation -> (its result, its cell record)."""
    from ifedicl.federation_job.driver import Federation

    objective = mc.settings.objective_for(cell.method)
    result = Federation(mc.model_id, task.source, mc.store_uri, federation_settings(mc, cell)).run(publish=False)
    return result, _run_record(mc, task, result, objective)


def _run_record(mc: MethodContext, task: PreparedTask, result, objective: str) -> dict:
    """A run's cell record: test accuracy of its Λ after every scored round (``settings.scored_rounds`` and
    ``also_scored_rounds``), read back from the store (round 0 = its starting Λ), and Λ after every round, scored
    or not (4L numbers each), so a round left unscored can be scored later without running the federation again,
    and under the second-order round its trust region per round (``trust_region_trace``)."""
    from ifedicl.federation_job.second_order import trust_region_trace
    from ifedicl.storage.store import Store

    store = Store(mc.store_uri)
    by_round = store.coefficients_by_round(result.run_id)
    rounds = scored_rounds(sorted(by_round), mc.settings.scored_rounds, mc.settings.also_scored_rounds)
    trace = trust_region_trace(store.server_states(result.run_id))
    return {
        **federated_cell(result, _scores(mc, task, result.vectors, by_round, rounds), objective),
        "coefficients": result.coefficients.tolist(),
        "coefficients_by_round": {str(r): by_round[r].tolist() for r in sorted(by_round)},
        **({"trust_region_by_round": trace} if trace else {}),
    }


def _scores(mc: MethodContext, task: PreparedTask, vectors, by_round: dict, rounds: list[int]) -> list[dict]:
    """[{round, accuracy, macro_f1}] of Λ after each of ``rounds`` on the test set."""
    s = mc.settings
    return [
        {"round": r, **score(mc.ctx, mc.tokenizer, task.spec, task.test, None, vectors, by_round[r], s.batch_size)}
        for r in rounds
    ]


def score_kept_rounds(mc: MethodContext, task: PreparedTask, record: dict) -> dict:
    """``record`` with the rounds :func:`rounds_to_score` names scored: their Λ from the cell, the context vectors
    and the client CPU spent by each round from the run in the federation store. The scores are those the
    federation's own cell would have recorded (same vectors, Λ and test set); ``scored_later`` says which rounds
    came afterwards and by which code, or why they could not (the store is local: a clean checkout has none)."""
    from ifedicl.evaluation.context import client_cpu_through_round
    from ifedicl.evaluation.report import code_version
    from ifedicl.storage.store import Store, StoreError

    rounds = rounds_to_score(mc.settings, record)
    later = {"rounds": rounds, "code_version": code_version()}
    try:
        run = Store(mc.store_uri).load_run(record["task"], record["run_id"])
    except StoreError as err:
        log.warning("%s %s seed %s keeps its scored rounds: %s", record["method"], record["task"], record["seed"], err)
        return {**record, "scored_later": record.get("scored_later", []) + [{**later, "not_scored": str(err)}]}
    by_round = {r: np.asarray(record["coefficients_by_round"][str(r)], dtype=np.float32) for r in rounds}
    spent = client_cpu_through_round(run.summary)
    scores = _scores(mc, task, run.vectors, by_round, rounds)
    added = [{**p, "client_cpu_seconds": spent.get(p["round"])} for p in scores]
    per_round = sorted(record["per_round"] + added, key=lambda p: p["round"])
    return {**record, "per_round": per_round, "scored_later": record.get("scored_later", []) + [later]}


def _recalibrated(mc: MethodContext, task: PreparedTask, cell: Cell, live, live_record: dict, start: str) -> dict:
    """The recalibration ``ifedicl recalibrate --mode stage2`` runs after the clients' data changed: Λ alone,
    on the live run's vectors, over a new split of the data (seed + RESPLIT_SEED_OFFSET), starting from the
    live Λ (``warm``) or from the initial Λ (``cold``). Both spend the same client compute; the cell records
    the recalibration (its accuracy, rounds, bytes and client seconds) and the live run it followed."""
    from ifedicl.federation_job.recalibrate import Stage2Federation

    settings = replace(federation_settings(mc, cell), seed=cell.seed + RESPLIT_SEED_OFFSET)
    fed = Stage2Federation(mc.model_id, task.source, mc.store_uri, settings, vectors=live.vectors)
    if start == "warm":
        fed.start_from(live.coefficients)
    result = fed.run(publish=False)
    live_summary = {k: live_record[k] for k in ("accuracy", "run_id", "per_round", "client_cpu_seconds", "comm")}
    return {
        **_run_record(mc, task, result, live_record["objective"]),
        "recalibration": {"start": start, "live": live_summary},
    }
