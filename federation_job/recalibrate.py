"""Scheduled recalibration: re-run a task's federation, publish only if it is not worse.

``recalibrate`` runs a candidate (the full federation, or only stage 2 from the
published run's vectors), scores the candidate and the live run on the same
held-out examples, and publishes the candidate only if
``candidate_accuracy >= live_accuracy - margin`` (a negative margin demands a gain).
The held-out examples are the server's own test split (the simulation) or, for clients
with their own data, the clients' held-out splits: each client scores both Λ and the
server pools the per-class counts (federated evaluation), so no example leaves a client.
Every attempt (published, kept_live, failed, busy) is a row in the store's
``recalibrations`` table.

Concurrency: the guarantee is the store's. Publishing is a compare-and-set committed
by LanceDB (``Store.publish(run, expect_live=...)``): if the live run is no longer the
one the candidate was compared with (a manual publish or rollback, or a concurrent
recalibration that published first), nothing is published and the attempt is
``failed`` with that reason. This holds across processes and hosts, on a local
directory or an object store alike. The file lock beside a local store is a courtesy
on top: it spares a second attempt the work of a candidate that would lose the race
(it waits up to ``lock_timeout_s`` and then gives up, ``busy``); for an object-store
URI it only spans one host unless ``lock_path`` is on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from ifedicl.federation_job import wire
from ifedicl.federation_job.client import accuracy
from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.federation_job.exchange import log_event
from ifedicl.federation_job.population import Population
from ifedicl.federation_job.tail_average import checked_iterates, split_state
from ifedicl.kernel.errors import FederationError, IfediclError
from ifedicl.kernel.modeling import DTYPES, ModelFingerprint, load_model
from ifedicl.kernel.sources import DataSource
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.storage.recalibrations import Attempt, now, record_attempt
from ifedicl.storage.store import (
    ModelMismatchError,
    PublicationConflict,
    RoundRecord,
    Store,
    StoreError,
    check_fingerprint,
)

log = logging.getLogger("ifedicl.recalibrate")

MODES = ("full", "stage2")

# Exit codes of `ifedicl recalibrate` (2 stays the CLI's code for a usage/input error).
EXIT_PUBLISHED = 0
EXIT_KEPT_LIVE = 1
EXIT_FAILED = 2
EXIT_BUSY = 3


class RecalibrationBusy(IfediclError):
    """Another recalibration of the same task holds the lock."""


@dataclass
class RecalibrationOutcome:
    attempt: Attempt

    @property
    def published(self) -> bool:
        return self.attempt.decision == "published"

    @property
    def exit_code(self) -> int:
        return {"published": EXIT_PUBLISHED, "kept_live": EXIT_KEPT_LIVE, "busy": EXIT_BUSY}.get(
            self.attempt.decision, EXIT_FAILED
        )


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def default_lock_path(store_uri: str, task: str) -> Path:
    """``<store parent>/.<store name>.recalibrate.<task>.lock`` for a local store; a temp path otherwise."""
    safe_task = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    if is_local(store_uri):
        store = Path(store_uri.removeprefix("file://")).resolve()
        return store.parent / f".{store.name}.recalibrate.{safe_task}.lock"
    log.info(
        "store %s is an object store: the recalibration lock only spans this host (publishing stays a "
        "compare-and-set in the store); pass --lock-file on a shared filesystem to also spare duplicate work",
        store_uri,
    )
    safe_uri = "".join(c if c.isalnum() else "_" for c in store_uri)[-80:]
    return Path(tempfile.gettempdir()) / f"ifedicl.{safe_uri}.recalibrate.{safe_task}.lock"


class Stage2Federation(Federation):
    """A federation whose stage 1 is replaced by broadcasting given (published) vectors.

    Clients upload nothing in round 0; only Λ is recalibrated. Reuses the driver's
    actors, round loop, drop handling, store writes and evaluation unchanged.
    """

    def __init__(self, *args, vectors: np.ndarray, **kwargs):
        super().__init__(*args, **kwargs)
        self.published_vectors = np.asarray(vectors, dtype=np.float32)

    def stage_one(self) -> tuple[np.ndarray, RoundRecord]:
        start = time.monotonic()
        sampled = sorted(self.alive)
        broadcast = wire.encode({"vectors": self.published_vectors})
        sent = self.pool.call("broadcast", 0, "set_global_vectors", {cid: broadcast for cid in sampled})
        acks, dropped = sent.answers, sent.dropped
        self.strategies.vectors.selection.require(len(acks), "stage 1 (broadcast of the published vectors)")
        answered = sorted(acks)
        record = RoundRecord(
            round=0,
            clients_sampled=sampled,
            clients_answered=answered,
            dropped=dropped,
            mean_loss=None,
            bytes_up=[0] * len(answered),
            bytes_down=[len(broadcast)] * len(sampled),
            seconds=time.monotonic() - start,
        )
        return self.published_vectors, record


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _live_accuracy(
    fed: Federation, summary: dict, store: Store, live_run_id: str, dtype: str | None = None
) -> tuple[float | None, str]:
    """The live run's accuracy on the candidate's held-out examples with the model in use (in ``dtype``):
    scored by the clients beside the candidate (in its run's ``summary``), or by the server on its test
    split; else as recorded."""
    if "live_accuracy" in summary:
        return _finite(summary["live_accuracy"]), "live run scored by the clients on their held-out splits"

    def recorded(why: str) -> tuple[float | None, str]:
        accuracy_then = json.loads(store.run_row(live_run_id)["summary"] or "{}").get("accuracy")
        return _finite(accuracy_then), f"live run scored by its recorded accuracy ({why})"

    try:
        stored = store.load_run(fed.task.name, live_run_id, expect=fed.fingerprint)
    except ModelMismatchError as err:
        return recorded(str(err))
    if not len(fed.population.server_test):
        return recorded("the clients did not score it")
    return _score(fed, stored, dtype or fed.settings.dtype), "live run re-scored on the same held-out split"


def _score(fed: Federation, run, dtype: str) -> float:
    """``run``'s accuracy on the held-out split with the model's weights in ``dtype``."""
    ctx = HFContextModel(load_model(fed.model_id, dtype))
    try:
        return accuracy(ctx, fed.tokenizer, fed.task, fed.population.server_test, run.vectors, run.coefficients)
    finally:
        ctx.remove_hooks()


def recalibrate(
    model_id: str,
    source: Population | DataSource,
    store_uri: str,
    settings: FederationSettings,
    mode: str = "full",
    margin: float = 0.0,
    lock_timeout_s: float = 0.0,
    lock_path: str | Path | None = None,
    after_dispatch=None,
    serving_dtype: str | None = None,
    warm_start: bool = True,
    allow_weaker_protections: bool = False,
) -> RecalibrationOutcome:
    """One attempt; always recorded. Raises only for bad arguments (nothing recorded then).

    ``allow_weaker_protections``: publish even if the candidate's privacy/robustness settings are weaker
    than the live run's (:func:`weakened_protections`; what was weakened is recorded with the attempt).

    ``warm_start``: stage 2 starts from the live run's Λ (when the live run was made with this model),
    not from the initial Λ, so a recalibration refines what is served instead of starting over.

    ``serving_dtype`` (what ``ifedicl serve --dtype`` computes in, when it differs from the
    run's ``settings.dtype``): candidate and live are both scored in it, so the guardrail
    compares what clients would get.
    """
    if mode not in MODES:
        raise IfediclError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    if serving_dtype is not None and serving_dtype not in DTYPES:
        raise IfediclError(f"--serving-dtype must be one of {sorted(DTYPES)} (got {serving_dtype!r})")
    if not math.isfinite(margin) or abs(margin) > 1:
        raise IfediclError(f"--margin must be an accuracy difference in [-1, 1] (got {margin})")
    task_name = source.task.name if isinstance(source, Population) else source.load().task.name
    attempt = Attempt(attempt_id=uuid.uuid4().hex, task=task_name, mode=mode, margin=margin)
    attempt.metrics["host"] = socket.gethostname()
    lock = FileLock(str(lock_path or default_lock_path(store_uri, task_name)))
    Path(lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
    attempt.metrics["lock_file"] = lock.lock_file
    store = Store(store_uri, create=True)
    try:
        lock.acquire(timeout=lock_timeout_s)
    except Timeout:
        attempt.decision = "busy"
        attempt.reason = (
            f"another recalibration of task {task_name!r} holds {lock.lock_file} "
            f"(waited {lock_timeout_s:g}s); nothing was run or published"
        )
        return _finish(store, attempt)
    try:
        attempt.metrics["lock_acquired_at"] = now().isoformat()
        _run_attempt(
            attempt, model_id, source, store_uri, store, settings, mode, margin, after_dispatch, serving_dtype,
            warm_start, allow_weaker_protections,
        )  # fmt: skip
    except Exception as err:  # recorded, then reported by the caller
        attempt.decision = "failed"
        attempt.reason = f"{type(err).__name__}: {err}".splitlines()[0]
        log.debug("recalibration failed", exc_info=True)
    finally:
        attempt.metrics["lock_released_at"] = now().isoformat()
        lock.release()
    return _finish(store, attempt)


def _finish(store: Store, attempt: Attempt) -> RecalibrationOutcome:
    attempt.finished_at = now()
    record_attempt(store, attempt)
    log_event(
        "recalibration",
        task=attempt.task,
        attempt=attempt.attempt_id,
        mode=attempt.mode,
        decision=attempt.decision,
        candidate=attempt.candidate_run_id,
        live=attempt.live_run_id,
        candidate_accuracy=attempt.candidate_accuracy,
        live_accuracy=attempt.live_accuracy,
        reason=attempt.reason,
    )
    return RecalibrationOutcome(attempt)


def weakened_protections(live: dict, settings: FederationSettings) -> list[str]:
    """The flags of the live run's privacy and robustness that ``settings`` would drop or weaken.

    ``live`` is the run row's recorded settings. A recalibration replaces what is served, so
    publishing one made with weaker protections than the live run's (no or less DP, no secure
    aggregation, a looser norm screen, a non-robust aggregator, fewer clients per masked sum) would
    quietly undo a decision taken for the data owners; it has to be asked for explicitly.
    """
    weaker = []

    def given(value) -> str:
        return "none" if value is None else f"{value:g}"

    privacy = live.get("privacy") or {}
    for field, flag in (("vector_epsilon", "--dp-vector-epsilon"), ("coefficient_epsilon", "--dp-coefficient-epsilon")):
        was, now = privacy.get(field), getattr(settings.privacy, field)
        if was is not None and (now is None or now > was):
            weaker.append(f"{flag} {was:g} (given: {given(now)})")
    dp_was = privacy.get("vector_epsilon") is not None or privacy.get("coefficient_epsilon") is not None
    if dp_was and settings.privacy.delta > privacy.get("delta", 1e-5):
        weaker.append(f"--dp-delta {privacy.get('delta', 1e-5):g} (given: {settings.privacy.delta:g})")
    if live.get("secagg") and not settings.secagg:
        weaker.append("--secagg")
    if live.get("secagg") and settings.min_clients < live.get("min_clients", 1):
        weaker.append(f"--min-clients {live['min_clients']} under --secagg (given: {settings.min_clients})")
    threshold_was = live.get("secagg_threshold", 0.5)  # fewer colluders suffice to unmask below the live threshold
    if live.get("secagg") and settings.secagg and settings.secagg_threshold < threshold_was:
        weaker.append(f"--secagg-threshold {threshold_was:g} (given: {settings.secagg_threshold:g})")
    screen_was, screen_now = live.get("reject_norm_factor", 10.0), settings.reject_norm_factor
    if not live.get("secagg") and screen_was > 0 and (screen_now == 0 or screen_now > screen_was):
        weaker.append(f"--reject-norm-factor {screen_was:g} (given: {screen_now:g}; 0 is off)")
    if live.get("aggregator", "mean") != "mean" and settings.aggregator != live["aggregator"]:
        weaker.append(f"--aggregator {live['aggregator']} (given: {settings.aggregator})")
    trimmed = live.get("aggregator") == "trimmed-mean" == settings.aggregator
    if trimmed and settings.trim_fraction < live.get("trim_fraction", 0.1):
        weaker.append(f"--trim-fraction {live.get('trim_fraction', 0.1):g} (given: {settings.trim_fraction:g})")
    return weaker


def _same_model(live_run_id: str, live, in_use: ModelFingerprint) -> bool:
    try:
        check_fingerprint(live_run_id, live.fingerprint, in_use)
    except ModelMismatchError:
        return False
    return True


def _warm_start(attempt: Attempt, live_run_id: str | None, live, in_use: ModelFingerprint) -> np.ndarray | None:
    """The live run's Λ to start stage 2 from, or None (no live run, or one made with another model: recorded)."""
    attempt.metrics["warm_start_from"] = None
    if live is None:
        return None
    try:
        check_fingerprint(live_run_id, live.fingerprint, in_use)
    except ModelMismatchError as err:
        attempt.metrics["cold_start_reason"] = str(err)
        return None
    attempt.metrics["warm_start_from"] = live_run_id
    return live.coefficients


def _live_server_state(
    store: Store, live_run_id: str, settings, live_coefficients: np.ndarray
) -> dict[str, np.ndarray] | None:
    """The live run's last server state, if it kept one with the round method and optimizer this run uses
    (another optimizer's moments, or a trust region's radius, mean something else: that recalibration starts
    its server step afresh). A run that averages takes the live run's tail-average iterates too and continues
    the window from the last one. A run that publishes its own Λ starts from ``live_coefficients`` [L, 2, 2]
    (what the live run published), so it takes the rule's state only where that Λ is the live run's last
    iterate: a trust region's state describes the step that made the iterate, not the mean of several."""
    live_settings = json.loads(store.run_row(live_run_id)["settings"] or "{}")
    same_kind = (live_settings.get("stage2", "local-steps"), live_settings.get("server_optimizer", "sgd"))
    if same_kind != (settings.stage2, settings.server_optimizer):
        return None
    stored = store.server_state(live_run_id)
    if stored is None:
        return None
    if settings.average_rounds > 1:
        return stored[1]
    rule, iterates = split_state(stored[1])
    if iterates is not None:
        try:
            window = checked_iterates(iterates, np.shape(live_coefficients))
        except FederationError:
            return None  # not a window of this model's Λ: nothing of it to continue
        if not np.allclose(window[-1], live_coefficients, atol=1e-6):
            return None
    return rule or None


def _run_attempt(
    attempt,
    model_id,
    source,
    store_uri,
    store,
    settings,
    mode,
    margin,
    after_dispatch,
    serving_dtype=None,
    warm_start=True,
    allow_weaker=False,
) -> None:
    live_run_id = store.published_run_id(attempt.task)
    attempt.live_run_id = live_run_id
    if live_run_id is not None:
        weaker = weakened_protections(json.loads(store.run_row(live_run_id)["settings"] or "{}"), settings)
        attempt.metrics["weakened_protections"] = weaker
        if weaker and not allow_weaker:
            raise IfediclError(
                f"the live run {live_run_id} was made with {', '.join(weaker)}: a recalibration must keep its "
                "privacy and robustness; pass the same flags (or --allow-weaker-protections, recorded)"
            )
    if mode == "stage2" and live_run_id is None:
        raise StoreError(f"task {attempt.task!r} has no published run: stage2 needs its vectors (use --mode full)")
    needs_live = live_run_id is not None and (mode == "stage2" or warm_start)
    live = store.load_run(attempt.task, live_run_id) if needs_live else None
    if mode == "stage2":
        fed = Stage2Federation(model_id, source, store_uri, settings, after_dispatch, vectors=live.vectors)
        check_fingerprint(live_run_id, live.fingerprint, fed.fingerprint)
    else:
        fed = Federation(model_id, source, store_uri, settings, after_dispatch)
    start = _warm_start(attempt, live_run_id, live, fed.fingerprint) if warm_start else None
    if start is not None:
        fed.start_from(start, _live_server_state(store, live_run_id, settings, start))
    clients_evaluate = not len(fed.population.server_test)
    if clients_evaluate and not any(client.test is not None for client in fed.population.clients):
        raise IfediclError("the data has no held-out split to compare candidate and live run on (give clients a test)")
    if clients_evaluate and live_run_id is not None:
        live = live or store.load_run(attempt.task, live_run_id)
    if clients_evaluate and live is not None and _same_model(live_run_id, live, fed.fingerprint):
        fed.reference = (live.vectors, live.coefficients)  # the clients score the live run beside the candidate
    result = fed.run(publish=False)
    attempt.candidate_run_id = result.run_id
    attempt.candidate_accuracy = _finite(result.summary.get("accuracy"))
    attempt.zero_shot_accuracy = _finite(result.summary.get("zero_shot_accuracy"))
    attempt.eval_examples = int(result.summary.get("test_examples", 0))
    attempt.metrics.update(
        candidate_seconds=result.summary.get("seconds"),
        rounds=len(result.rounds) - 1,
        final_mean_loss=result.rounds[-1].mean_loss if result.rounds else None,
    )
    if attempt.candidate_accuracy is None:
        raise IfediclError("the candidate has no accuracy on the held-out split")
    compare_dtype = serving_dtype or settings.dtype
    attempt.metrics["compared_in_dtype"] = compare_dtype
    if compare_dtype != settings.dtype and not clients_evaluate:  # the clients score in the run's dtype
        attempt.metrics[f"candidate_accuracy_{settings.dtype}"] = attempt.candidate_accuracy
        attempt.candidate_accuracy = _score(fed, store.load_run(attempt.task, result.run_id), compare_dtype)
    if live_run_id is None:
        reason = "no live run yet"
    else:
        attempt.live_accuracy, how = _live_accuracy(fed, result.summary, store, live_run_id, compare_dtype)
        attempt.metrics["live_scoring"] = how
        if attempt.live_accuracy is not None:
            floor = attempt.live_accuracy - margin
            if attempt.candidate_accuracy < floor:
                attempt.decision = "kept_live"
                attempt.reason = (
                    f"candidate {result.run_id} accuracy {attempt.candidate_accuracy:.4f} is below live "
                    f"{live_run_id} accuracy {attempt.live_accuracy:.4f} minus margin {margin:g} "
                    f"(= {floor:.4f}) on {attempt.eval_examples} held-out examples; kept the live run"
                )
                return
        reason = (
            f"candidate accuracy {attempt.candidate_accuracy:.4f} >= live {attempt.live_accuracy} - margin {margin:g}"
        )
    # Compare-and-set, committed by the store: a publish or rollback made meanwhile by anyone wins.
    try:
        store.publish(result.run_id, expect_live=live_run_id)
    except PublicationConflict:
        current = store.published_run_id(attempt.task)
        raise StoreError(f"the live run changed from {live_run_id} to {current} during the recalibration") from None
    attempt.decision = "published"
    attempt.reason = f"published {result.run_id}: {reason}"


