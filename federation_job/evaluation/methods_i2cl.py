"""Context-vector methods: I2CL centralized, local-only calibration, and IFed-ICL on Ray.

Budget parity: centralized and local-only calibration run ``rounds × local_epochs``
epochs, the same number of passes over each example a federated client makes.
IFed-ICL is the real :class:`Federation` (Ray actors, wire bytes, LanceDB store);
its Λ after every round is read back from the store and scored on the test set.
"""

from __future__ import annotations

import time

import numpy as np

from federation_job.client import CalibrationConfig, Client
from federation_job.evaluation.context import MethodContext, no_communication
from federation_job.evaluation.metrics import mean_std
from federation_job.evaluation.scoring import score
from federation_job.evaluation.settings import Cell
from federation_job.evaluation.tasks import PreparedTask
from model_patches.injection import initial_coefficients


def _calibrate_alone(mc: MethodContext, task: PreparedTask, data, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """One party with ``data``: extract its vectors, calibrate Λ from the initial values; timed."""
    s = mc.settings
    start = time.monotonic()
    client = Client(mc.ctx, mc.tokenizer, task.spec, data)
    vectors = client.extract_vectors(batch_size=8)
    init = initial_coefficients(mc.ctx.num_layers).numpy()
    result = client.calibrate(vectors, init, CalibrationConfig(epochs=s.rounds * s.local_epochs), seed)
    info = {"seconds": time.monotonic() - start, "steps": result.steps, "mean_loss": result.mean_loss}
    return vectors, result.coefficients, info


def i2cl_central(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    """All training data in one place: the upper bound the federation should approach."""
    vectors, coeffs, info = _calibrate_alone(mc, task, task.data.train, cell.seed)
    result = score(mc.ctx, mc.tokenizer, task.spec, task.test, None, vectors, coeffs, mc.settings.batch_size)
    return {
        **result,
        "client_seconds": info["seconds"],
        "calibration": info,
        "coefficients": coeffs.tolist(),
        "comm": no_communication(),
    }


def local_calibration(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    """Each client's own vectors and Λ, no federation (the paper's global-vs-local comparison)."""
    s = mc.settings
    per_client, local_coeffs = [], []
    for cid, shard in enumerate(task.shards(s.clients, cell.alpha, cell.seed, s.min_shard)):
        vectors, coeffs, info = _calibrate_alone(mc, task, shard, cell.seed * 1000 + cid)
        result = score(mc.ctx, mc.tokenizer, task.spec, task.test, None, vectors, coeffs, s.batch_size)
        per_client.append({"client": cid, "examples": len(shard), "seconds": info["seconds"], **result})
        local_coeffs.append(coeffs.tolist())
    acc = [c["accuracy"] for c in per_client]
    return {
        "accuracy": float(np.mean(acc)),
        "macro_f1": float(np.mean([c["macro_f1"] for c in per_client])),
        "client_accuracy_std": mean_std(acc)[1],
        "per_client": per_client,
        "client_seconds": float(np.mean([c["seconds"] for c in per_client])),
        "coefficients_per_client": local_coeffs,
        "comm": no_communication(),
    }


def _ifedicl_comm(rounds) -> dict:
    """Bytes as the driver measured them at the Ray boundary (len of each payload)."""
    stage1, stage2 = rounds[0], [r for r in rounds if r.round > 0]
    return {
        "stage1_up_per_client": float(np.mean(stage1.bytes_up)),
        "stage1_down_per_client": float(np.mean(stage1.bytes_down)),
        "round_up_per_client": float(np.mean([b for r in stage2 for b in r.bytes_up])),
        "round_down_per_client": float(np.mean([b for r in stage2 for b in r.bytes_down])),
        "total_up": int(sum(sum(r.bytes_up) for r in rounds)),
        "total_down": int(sum(sum(r.bytes_down) for r in rounds)),
    }


def ifedicl(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    """The real Ray federation, then accuracy of the global Λ after every round (round 0 = initial Λ)."""
    from federation_job.driver import Federation, FederationSettings
    from storage.store import Store

    s = mc.settings
    settings = FederationSettings(
        clients=s.clients,
        alpha=cell.alpha,
        rounds=s.rounds,
        local_epochs=s.local_epochs,
        seed=cell.seed,
        min_shard=s.min_shard,
        min_clients=1,
        weighted_vectors=s.weighted,
        weighted_coefficients=s.weighted,
        dtype=s.dtype,
    )
    result = Federation(mc.model_id, task.source, mc.store_uri, settings).run(publish=False)
    by_round = Store(mc.store_uri).coefficients_by_round(result.run_id)
    per_round = []
    for r in sorted(by_round):
        scored = score(mc.ctx, mc.tokenizer, task.spec, task.test, None, result.vectors, by_round[r], s.batch_size)
        per_round.append({"round": int(r), **scored})
    final = per_round[-1]
    return {
        "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"],
        "per_round": per_round,
        "run_id": result.run_id,
        # Clients run in parallel on Ray; the wall time of the client stages bounds each client's compute.
        "client_seconds": float(sum(r.seconds for r in result.rounds)),
        "client_seconds_note": "wall time of the Ray client stages (parallel clients, includes Ray overhead)",
        "dropped": {r.round: r.dropped for r in result.rounds if r.dropped},
        "coefficients": result.coefficients.tolist(),
        "comm": _ifedicl_comm(result.rounds),
    }
