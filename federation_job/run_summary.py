"""The run's summary row: bytes per round and client, client compute, privacy spent, test accuracy.

Why apart from the round loop: it only reads what the rounds recorded (the round records,
the compute clients reported, the settings) and scores the result once at the end; the
loop never needs any of it to decide anything.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ifedicl.federation_job import wire
from ifedicl.federation_job.client import accuracy
from ifedicl.federation_job.federation_settings import FederationSettings
from ifedicl.federation_job.privacy import ClientPrivacy, privacy_report
from ifedicl.federation_job.ray_pool import ClientCompute
from ifedicl.kernel.data import Split
from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.sources import ClientProfile
from ifedicl.kernel.task import TaskSpec
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.storage.records import RoundRecord


def summarize(
    rounds: list[RoundRecord],
    client_compute: ClientCompute,
    settings: FederationSettings,
    privacy: ClientPrivacy,
    shard_sizes: list[int],
    seconds: float,
    releases: dict[int, int] | None = None,
) -> dict:
    """Everything but the accuracies: bytes per round and client, compute, aggregation and privacy."""
    per_round = [
        {
            "round": r.round,
            "answered": len(r.clients_answered),
            "bytes_up_per_client": r.bytes_up,
            "bytes_down_per_client": r.bytes_down,
            "mean_loss": r.mean_loss,
            "client_seconds": {
                stage: {str(c): v for c, v in by_client.items()}
                for stage, by_client in client_compute.get(r.round, {}).items()
            },
        }
        for r in rounds
    ]
    stage2 = [r for r in rounds if r.round > 0]
    return {
        **compute_summary(client_compute),
        "seconds": round(seconds, 3),
        "clients": settings.clients,
        "shard_sizes": shard_sizes,
        "stage1_bytes_up_per_client": max(rounds[0].bytes_up, default=0),
        "stage1_bytes_down_per_client": max(rounds[0].bytes_down, default=0),
        "round_bytes_up_per_client": max((b for r in stage2 for b in r.bytes_up), default=0),
        "round_bytes_down_per_client": max((b for r in stage2 for b in r.bytes_down), default=0),
        "total_bytes_up": sum(sum(r.bytes_up) for r in rounds),
        "total_bytes_down": sum(sum(r.bytes_down) for r in rounds),
        "rounds": per_round,
        "aggregation": {
            "aggregator": settings.aggregator,
            "trim_fraction": settings.trim_fraction,
            "reject_norm_factor": 0.0 if settings.secagg else settings.reject_norm_factor,
            "secagg": settings.secagg,
            "server_optimizer": settings.server_optimizer,
            "server_lr": settings.server_lr,
            **({"server_momentum": settings.server_momentum} if settings.server_optimizer != "sgd" else {}),
            "server_warmup": settings.server_warmup,
            "server_decay": settings.server_decay,
        },
        "rejected": {
            str(r.round): {str(c): why for c, why in r.dropped.items() if why.startswith("rejected")}
            for r in rounds
            if any(why.startswith("rejected") for why in r.dropped.values())
        },
        "privacy": privacy_summary(rounds, settings, privacy, releases),
    }


def privacy_summary(
    rounds: list[RoundRecord], settings: FederationSettings, privacy: ClientPrivacy, releases: dict[int, int] | None
) -> dict:
    """Settings, noise multipliers and ε spent, worst case over clients: the most Λ releases any one made.

    ``releases`` counts every Λ upload the server received from a client, used or rejected (each spent
    privacy); without it, the rounds' answering clients are counted.
    """
    if releases is None:
        releases = {}
        for r in rounds[1:]:
            for cid in r.clients_answered:
                releases[cid] = releases.get(cid, 0) + 1
    report = privacy_report(settings.privacy, privacy, max(releases.values(), default=0))
    report["secagg"] = settings.secagg
    return report


def compute_summary(client_compute: ClientCompute) -> dict:
    """Client-reported compute, summed: per run, per stage and per client (CPU and wall seconds).

    Measured inside each actor around each request (:mod:`ifedicl.federation_job.compute`); what a
    client spent on a request it never answered (it died or timed out) is not known here.
    """
    reports = [
        (stage, cid, report)
        for by_stage in client_compute.values()
        for stage, by_client in by_stage.items()
        for cid, report in by_client.items()
    ]

    def total(items, key: str) -> float:
        return round(sum(r[key] for _, _, r in items), 4)

    stages = sorted({stage for stage, _, _ in reports})
    clients = sorted({cid for _, cid, _ in reports})
    return {
        "client_cpu_seconds": total(reports, "cpu_s"),
        "client_wall_seconds": total(reports, "wall_s"),
        "client_seconds_by_stage": {
            stage: {k: total([x for x in reports if x[0] == stage], f"{k}_s") for k in ("cpu", "wall")}
            for stage in stages
        },
        "client_seconds_per_client": {
            str(cid): {k: total([x for x in reports if x[1] == cid], f"{k}_s") for k in ("cpu", "wall")}
            for cid in clients
        },
    }


def held_out_accuracy(
    model: Callable[[], object],
    tokenizer,
    task: TaskSpec,
    test: Split,
    dtype: str,
    vectors: np.ndarray,
    coefficients: np.ndarray,
) -> dict:
    """Zero-shot and with-context accuracy on the server's held-out split, scored by the driver.

    ``model`` is called only if there is a test split: without one nothing is loaded and {} comes back.
    """
    if not len(test):
        return {}
    ctx = HFContextModel(model())
    try:
        return {
            "dtype": dtype,  # what the accuracies below were scored in
            "evaluated_by": "server",
            "test_examples": len(test),
            "zero_shot_accuracy": accuracy(ctx, tokenizer, task, test),
            "accuracy": accuracy(ctx, tokenizer, task, test, vectors, coefficients),
        }
    finally:
        ctx.remove_hooks()


SCORED = ("zero_shot", "injected", "live")  # what a client's evaluation answer may count, besides "total"
ACCURACY_KEYS = {"zero_shot": "zero_shot_accuracy", "injected": "accuracy", "live": "live_accuracy"}


def _client_counts(payload: object, profile: ClientProfile, classes: int) -> dict[str, np.ndarray]:
    """One client's evaluation answer, checked: [C] non-negative whole counts, correct <= total, the total
    what it said it holds. Anything else is a rejected answer, recorded, never pooled."""
    fields = len(SCORED) + 1  # the scored counts and "total", [C] int64 each
    arrays, _ = wire.decode(payload, limit=wire.upload_limit(fields * classes, fields, 8))
    if "total" not in arrays or not set(arrays) <= {"total", *SCORED}:
        raise ValueError(f"unexpected fields {sorted(arrays)}")
    for name, counts in arrays.items():
        if counts.shape != (classes,) or counts.dtype.kind not in "iu" or (counts < 0).any():
            raise ValueError(f"{name} must be {classes} non-negative integer counts")
        if (counts > arrays["total"]).any():
            raise ValueError(f"{name} counts more correct answers than examples")
    if int(arrays["total"].sum()) != profile.test_examples:
        raise ValueError(f"it counted {int(arrays['total'].sum())} examples, not the {profile.test_examples} it holds")
    return {name: counts.astype(np.int64) for name, counts in arrays.items()}


def _accuracies(counts: dict[str, np.ndarray]) -> dict:
    total = int(counts["total"].sum())
    report: dict = {"test_examples": total}
    for name, key in ACCURACY_KEYS.items():
        if name in counts and total:
            report[key] = float(counts[name].sum() / total)
    return report


def federated_accuracy(
    answers: dict[int, object],
    profiles: dict[int, ClientProfile],
    names: dict[int, str],
    classes: int,
    dropped: dict[int, str],
) -> dict:
    """Per-client and pooled accuracies from the clients' per-class counts on their own held-out splits.

    The pooled figure counts every held-out example of every answering client once (a client with
    more examples weighs more), as a server-side test set of all of them would.
    """
    per_client, pooled = {}, {}
    for cid, payload in sorted(answers.items()):
        try:
            counts = _client_counts(payload, profiles[cid], classes)
        except (IfediclError, ValueError, TypeError, KeyError) as err:
            dropped[cid] = f"rejected evaluation: {err}"
            continue
        per_client[names[cid]] = _accuracies(counts)
        for name, value in counts.items():
            pooled[name] = pooled.get(name, np.zeros(classes, dtype=np.int64)) + value
    return {
        "clients": per_client,
        "pooled": _accuracies(pooled) if pooled else {"test_examples": 0},
        "pooled_per_class": {name: value.tolist() for name, value in pooled.items()},
        "dropped": {names[cid]: reason for cid, reason in sorted(dropped.items())},
    }
