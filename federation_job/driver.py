"""The federation driver: stage 1 (vectors) then R rounds of stage 2 (Λ), on Ray.

Runs on a local Ray it starts itself, or unchanged under ``ray job submit`` /
``RAY_ADDRESS`` on an existing cluster. Only this process writes to the store.
A client that dies or times out is dropped from the round and recorded; a round
with fewer than ``min_clients`` answers fails the run cleanly (nothing published).

Trust options (see README "Trust model"): updates are screened and combined by a
:class:`~ifedicl.federation_job.robust.RobustStrategy`; clients may clip and noise what they
upload (:mod:`ifedicl.federation_job.privacy`); under ``secagg`` the server only ever sees the
cohort's sum (:mod:`ifedicl.federation_job.secagg`). A run whose driver dies is reaped by the
next run (:mod:`ifedicl.federation_job.liveness`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm.auto import tqdm

from ifedicl.federation_job import compute, liveness, wire
from ifedicl.federation_job.actors import ClientActor
from ifedicl.federation_job.client import CalibrationConfig, accuracy
from ifedicl.federation_job.objective import OBJECTIVES
from ifedicl.federation_job.partition import dirichlet_partition
from ifedicl.federation_job.privacy import ClientPrivacy, PrivacySettings, privacy_report
from ifedicl.federation_job.robust import AGGREGATORS, NormScreen, RobustStrategy
from ifedicl.federation_job.secagg import MIN_COHORT, unmask_sum
from ifedicl.federation_job.strategies import ClientUpdate, check_update
from ifedicl.kernel.errors import FederationError, IfediclError
from ifedicl.kernel.modeling import (
    DTYPES,
    canonical_model_id,
    fingerprint,
    load_config,
    load_model,
    load_shared_weights,
    load_tokenizer,
    model_from_weights,
)
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import label_token_ids
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.injection import initial_coefficients
from ifedicl.storage.store import RoundRecord, Store

log = logging.getLogger("ifedicl.federation")

# Ray starts helper processes with fork+exec (subprocess); the child execs at once and never
# touches LanceDB's runtime, so LanceDB's generic fork warning does not apply here.
warnings.filterwarnings("ignore", message="lancedb fork support is experimental")

# Quiet library chatter inside actors; progress is reported by the driver.
ACTOR_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class FederationSettings:
    clients: int = 10
    alpha: float = 0.5
    rounds: int = 5
    local_epochs: int = 1
    fraction: float = 1.0  # of alive clients sampled per round
    min_clients: int = 1
    round_timeout_s: float = 1800.0
    seed: int = 0
    min_shard: int = 2
    weighted_vectors: bool = False  # paper: unweighted
    weighted_coefficients: bool = False  # paper: unweighted
    capture_batch_size: int = 8
    stage1_examples: int | None = None  # each client builds v_k from at most this many of its examples (None: all)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    weights: str = "shared"  # shared: one object-store copy per node; per-actor: each loads its own
    cpus_per_client: float | None = None  # default: the machine's CPUs split over the clients
    gpus_per_client: float = 0.0
    dtype: str = "float32"  # weights; calibration needs float32 (I2CL)
    extract_dtype: str = "float32"  # stage-1 forwards under autocast, e.g. bfloat16 on GPUs
    aggregator: str = "mean"  # mean (FedAvg) | trimmed-mean | median, coordinate-wise, vectors and Λ
    trim_fraction: float = 0.1  # trimmed-mean: cut from each end
    reject_norm_factor: float = 10.0  # reject ||update - reference|| > factor * round median (0: off)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: bool = False  # pairwise-masked sums: the server sees no single client's vectors or Λ
    adversaries: dict[int, str] = field(default_factory=dict)  # drills/tests: {client: "scale:50,flip"}

    def validate(self) -> None:
        checks = [
            (self.clients >= 1, f"--clients must be >= 1 (got {self.clients})"),
            (self.alpha > 0, f"--alpha must be > 0 (got {self.alpha})"),
            (self.rounds >= 0, f"--rounds must be >= 0 (got {self.rounds})"),
            (self.local_epochs >= 1, f"--local-epochs must be >= 1 (got {self.local_epochs})"),
            (0 < self.fraction <= 1, f"--fraction must be in (0, 1] (got {self.fraction})"),
            (1 <= self.min_clients <= self.clients, f"--min-clients must be in 1..{self.clients}"),
            (self.round_timeout_s > 0, "--round-timeout must be > 0"),
            (self.weights in ("shared", "per-actor"), f"--weights must be shared or per-actor (got {self.weights})"),
            (self.dtype in DTYPES and self.extract_dtype in DTYPES, f"dtypes must be one of {sorted(DTYPES)}"),
            (self.calibration.batch_size >= 1, "--calib-batch-size must be >= 1"),
            (
                self.calibration.objective in OBJECTIVES,
                f"--objective must be one of {OBJECTIVES} (got {self.calibration.objective})",
            ),
            (self.capture_batch_size >= 1, "--batch-size must be >= 1"),
            (self.stage1_examples is None or self.stage1_examples >= 1, "--stage1-examples must be >= 1"),
            (self.aggregator in AGGREGATORS, f"--aggregator must be one of {AGGREGATORS} (got {self.aggregator})"),
            (0 <= self.trim_fraction < 0.5, "--trim-fraction must be in [0, 0.5)"),
            (self.reject_norm_factor >= 0, "--reject-norm-factor must be >= 0 (0: off)"),
            (
                not (self.aggregator != "mean" and (self.weighted_vectors or self.weighted_coefficients)),
                "--weighted only goes with --aggregator mean (robust aggregators are unweighted)",
            ),
            (
                not (self.secagg and self.aggregator != "mean"),
                "--secagg only supports --aggregator mean: robust aggregators need each update in the clear",
            ),
            (
                not (self.secagg and self.min_clients < MIN_COHORT),
                f"--secagg needs --min-clients >= {MIN_COHORT} (a sum of one client is its value)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise IfediclError(message)
        self.privacy.validate()
        from ifedicl.federation_job.adversary import parse_modes

        for spec in self.adversaries.values():
            parse_modes(spec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FederationResult:
    run_id: str
    published: bool
    coefficients: np.ndarray | None  # [L, 2, 2]; None for a FedAvg-LoRA run
    vectors: np.ndarray | None  # [L, 2, d]; None for a FedAvg-LoRA run
    rounds: list[RoundRecord]
    summary: dict


# Called after each stage's requests are dispatched (stage, round, {client: actor}); chaos tests kill actors here.
DispatchHook = Callable[[str, int, dict], None]
# Called after each stage's answers are gathered (stage, round, {client: payload bytes}, {client: actor}).
GatherHook = Callable[[str, int, dict, dict], None]


def _traffic(results: dict[int, bytes], sent: dict[int, int]) -> dict[str, dict[int, int]]:
    """Bytes per client so far this round: {"up": {client: n}, "down": {client: n}}; secagg adds to it."""
    from collections import defaultdict

    up: dict[int, int] = defaultdict(int, {cid: len(p) for cid, p in results.items()})
    return {"up": up, "down": defaultdict(int, sent)}


def _log_event(event: str, **fields) -> None:
    log.info(json.dumps({"event": event, **fields}, default=str))


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray. Returns True if we started it."""
    if ray.is_initialized():
        return False
    env = {"env_vars": ACTOR_ENV}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env=env,
            logging_level=logging.WARNING,
        )
    return True


def _gather(calls: dict[int, ray.ObjectRef], timeout_s: float, desc: str) -> tuple[dict[int, bytes], dict[int, str]]:
    """Wait for each client's answer until the deadline; failures become recorded drops."""
    pending = {ref: cid for cid, ref in calls.items()}
    results: dict[int, bytes] = {}
    dropped: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    with tqdm(total=len(calls), desc=desc, unit="client", leave=False) as bar:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                cid = pending.pop(ref)
                try:
                    results[cid] = ray.get(ref)
                except RayActorError as err:
                    dropped[cid] = f"client died ({type(err).__name__})"
                except RayTaskError as err:
                    dropped[cid] = f"client failed: {str(err.cause) if err.cause else err}".splitlines()[0]
                except GetTimeoutError:
                    dropped[cid] = "timed out"
                bar.update(1)
    for cid in pending.values():
        dropped[cid] = f"timed out after {timeout_s:g}s"
    return results, dropped


class Federation:
    """One federation run: owns the actors, the round loop and the store writes."""

    def __init__(
        self,
        model_id: str,
        source: DataSource,
        store_uri: str,
        settings: FederationSettings,
        after_dispatch: DispatchHook | None = None,
        after_gather: GatherHook | None = None,
    ):
        settings.validate()
        self.model_id = canonical_model_id(model_id)
        self.source = source
        self.settings = settings
        self.after_dispatch = after_dispatch
        self.after_gather = after_gather
        self.privacy: ClientPrivacy = settings.privacy.client_policy(settings.rounds)
        screen = NormScreen(0.0 if settings.secagg else settings.reject_norm_factor)
        self.vector_strategy = RobustStrategy(
            settings.aggregator, settings.trim_fraction, screen, settings.weighted_vectors
        )
        self.coefficient_strategy = RobustStrategy(
            settings.aggregator, settings.trim_fraction, screen, settings.weighted_coefficients
        )
        self.data = source.load()
        self.tokenizer = load_tokenizer(model_id)
        label_token_ids(self.data.task, self.tokenizer)  # fail early on labels sharing a first token
        self.fingerprint = fingerprint(self.model_id, load_config(model_id))
        self.shards = dirichlet_partition(
            self.data.train.labels, settings.clients, settings.alpha, settings.seed, settings.min_shard
        )
        self.store_uri = store_uri
        self.store: Store | None = None  # opened in run(), after Ray has forked its processes
        self.rounds: list[RoundRecord] = []
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.alive: set[int] = set()
        self.load_dropped: dict[int, str] = {}  # recorded with round 0
        self._driver_model = None
        self.shared_weights: ray.ObjectRef | None = None  # --weights shared: the object each node keeps one copy of
        # What each client reported it spent per request: {round: {stage: {client: {"cpu_s", "wall_s"}}}}
        self.client_compute: dict[int, dict[str, dict[int, dict[str, float]]]] = {}

    # ------------------------------------------------------------------ setup
    def _model_source(self):
        if self.settings.weights == "per-actor":
            return self.model_id
        # Loaded in a one-shot worker (max_calls=1): its private copy of the weights dies with the
        # process, and only the object-store copy remains. The driver's own model (for the final
        # evaluation) aliases that copy too, so the node holds one copy of the weights in all.
        loader = ray.remote(max_calls=1)(load_shared_weights)
        ref = loader.remote(self.model_id, self.settings.dtype)
        self._driver_model = model_from_weights(ray.get(ref))
        self.shared_weights = ref
        return ref

    def _start_actors(self) -> None:
        cpus = self.settings.cpus_per_client
        if cpus is None:
            cpus = max(0.01, float(ray.available_resources().get("CPU", 1)) / self.settings.clients)
        device = "cuda" if self.settings.gpus_per_client > 0 else "cpu"
        options = dict(num_cpus=cpus, num_gpus=self.settings.gpus_per_client, max_restarts=0, max_task_retries=0)
        remote = ray.remote(ClientActor).options(**options)
        model = self._model_source()
        for cid, indices in enumerate(self.shards):
            args = (cid, model, self.model_id, self.source, indices, self.settings.dtype, device, self.privacy)
            if cid in self.settings.adversaries:
                from ifedicl.federation_job.adversary import AdversarialClientActor

                evil = ray.remote(AdversarialClientActor).options(**options)
                self.actors[cid] = evil.remote(*args, adversary=self.settings.adversaries[cid])
            else:
                self.actors[cid] = remote.remote(*args)
        calls = {cid: a.ready.remote() for cid, a in self.actors.items()}
        if self.after_dispatch is not None:
            self.after_dispatch("load", 0, dict(self.actors))
        ready, dropped = _gather(calls, self.settings.round_timeout_s, "loading clients")
        self.alive = set(ready)
        for cid, reason in dropped.items():
            self.load_dropped[cid] = f"{reason} (while loading)"
            _log_event("client_dropped", stage="load", client=cid, reason=reason)
        self._require(len(self.alive), "loading")

    def _require(self, answered: int, stage: str) -> None:
        if answered < self.settings.min_clients:
            raise FederationError(
                f"{stage}: only {answered} client(s) answered, fewer than min_clients={self.settings.min_clients}; "
                "nothing was published"
            )

    # ------------------------------------------------------------------ stages
    def _call(self, stage: str, round_index: int, method: str, payloads: dict[int, bytes]):
        calls = {cid: getattr(self.actors[cid], method).remote(p) for cid, p in payloads.items()}
        if self.after_dispatch is not None:
            self.after_dispatch(stage, round_index, {cid: self.actors[cid] for cid in calls})
        results, dropped = _gather(calls, self.settings.round_timeout_s, f"{stage} r{round_index}")
        for cid, payload in results.items():
            self._note_compute(stage, round_index, cid, payload)
        if self.after_gather is not None:
            self.after_gather(stage, round_index, dict(results), {cid: self.actors[cid] for cid in calls})
        for cid, reason in dropped.items():
            self.alive.discard(cid)  # dead or stuck: not asked again this run
            _log_event("client_dropped", stage=stage, round=round_index, client=cid, reason=reason)
        return results, dropped

    def _note_compute(self, stage: str, round_index: int, cid: int, payload: object) -> None:
        """Keep the CPU and wall seconds a client reported in its answer's metadata (if it did)."""
        report = compute.reported(wire.meta_of(payload))
        if report is not None:
            self.client_compute.setdefault(round_index, {}).setdefault(stage, {})[cid] = report

    def _decode_updates(self, results: dict[int, bytes], key: str, shape: tuple, dropped: dict[int, str]):
        """Plain uploads -> checked updates; undecodable, wrong-shape or non-finite ones are recorded drops."""
        updates = []
        for cid, payload in sorted(results.items()):
            try:
                arrays, meta = wire.decode(payload)
                # under secagg the value stays on the client until its masked upload
                values = np.zeros(shape, np.float32) if self.settings.secagg else arrays[key]
                update = ClientUpdate(cid, values, int(meta["num_examples"]), meta.get("loss"))
                check_update(update, shape)
                updates.append(update)
            except (IfediclError, KeyError, ValueError, TypeError) as err:
                dropped[cid] = f"rejected update: {err}"
        return updates

    def _combine(
        self,
        stage: str,
        round_index: int,
        updates: list[ClientUpdate],
        shape: tuple,
        strategy: RobustStrategy,
        reference: np.ndarray | None,
        dropped: dict[int, str],
        traffic: dict[str, dict[int, int]],
    ) -> tuple[np.ndarray, list[ClientUpdate]]:
        """The round's aggregate and the updates in it: screened and robust in the clear, or a masked sum."""
        if self.settings.secagg:
            return self._secure_mean(stage, round_index, updates, shape, strategy.weighted, dropped, traffic)
        value, kept, rejected = strategy.aggregate(updates, reference)
        for cid, reason in rejected.items():
            dropped[cid] = reason
            _log_event("client_rejected", stage=stage, round=round_index, client=cid, reason=reason)
        self._require(len(kept), f"{stage} round {round_index} after screening" if rejected else stage)
        return value, kept

    def _secure_mean(
        self,
        stage: str,
        round_index: int,
        updates: list[ClientUpdate],
        shape: tuple,
        weighted: bool,
        dropped: dict[int, str],
        traffic: dict[str, dict[int, int]],
    ) -> tuple[np.ndarray, list[ClientUpdate]]:
        """Key agreement then masked uploads; a member lost after keys were agreed -> redo without it, fresh keys."""
        by_id = {u.client_id: u for u in updates}
        cohort = sorted(by_id)
        for attempt in range(len(cohort) + 1):
            self._require(len(cohort), f"{stage} round {round_index} (secure aggregation)")
            if len(cohort) < MIN_COHORT:
                raise FederationError(f"{stage}: secure aggregation needs at least {MIN_COHORT} clients")
            context = f"{getattr(self, 'run_id', '')}|{stage}|{round_index}|{attempt}"
            request = wire.encode({}, context=context)
            keys, lost = self._call(f"{stage}-keys", round_index, "secagg_keys", {c: request for c in cohort})
            for cid, reason in lost.items():
                dropped[cid] = f"{reason} (before masks were agreed)"
            public = {}
            for cid, payload in keys.items():
                try:
                    public[cid] = np.asarray(wire.decode(payload)[0]["public_key"], np.uint8).reshape(32)
                except (IfediclError, KeyError, ValueError) as err:
                    dropped[cid] = f"rejected key: {err}"
            for cid in cohort:
                traffic["down"][cid] += len(request)
                traffic["up"][cid] += len(keys.get(cid, b""))
            cohort = sorted(public)
            self._require(len(cohort), f"{stage} round {round_index} (secure aggregation)")
            upload_request = wire.encode(
                {"public_keys": np.stack([public[c] for c in cohort])}, cohort=cohort, context=context
            )
            masked, lost = self._call(
                f"{stage}-masked", round_index, "secagg_upload", {c: upload_request for c in cohort}
            )
            uploads = {}
            for cid, payload in masked.items():
                traffic["up"][cid] += len(payload)
                try:
                    uploads[cid] = wire.decode(payload)[0]["masked"]
                except (IfediclError, KeyError) as err:
                    lost[cid] = f"rejected masked upload: {err}"
            for cid in cohort:
                traffic["down"][cid] += len(upload_request)
            if not lost:
                total = unmask_sum([uploads[c] for c in cohort], shape)  # masks cancel: the cohort's sum
                members = [by_id[c] for c in cohort]
                divisor = sum(u.num_examples for u in members) if weighted else len(members)
                mean = total / divisor
                if not np.all(np.isfinite(mean)):
                    raise FederationError(f"{stage} round {round_index}: the securely aggregated sum is not finite")
                return mean.astype(np.float32), members
            for cid, reason in lost.items():
                self.alive.discard(cid)
                dropped[cid] = f"{reason} (after masks were agreed: masking redone without it)"
                _log_event("secagg_redo", stage=stage, round=round_index, client=cid, attempt=attempt)
            cohort = sorted(set(uploads) - set(lost))
        raise FederationError(f"{stage} round {round_index}: secure aggregation did not converge")

    def stage_one(self) -> np.ndarray:
        start = time.monotonic()
        sampled = sorted(self.alive)
        request = wire.encode(
            {},
            batch_size=self.settings.capture_batch_size,
            extract_dtype=self.settings.extract_dtype,
            max_examples=self.settings.stage1_examples,
            secagg=self.settings.secagg,
            weighted=self.settings.weighted_vectors,
        )
        results, dropped = self._call("extract", 0, "extract", {cid: request for cid in sampled})
        dropped = {**self.load_dropped, **dropped}
        shape = (self.fingerprint.num_layers, 2, self.fingerprint.hidden_size)
        updates = self._decode_updates(results, "vectors", shape, dropped)
        self._require(len(updates), "stage 1 (context vectors)")
        traffic = _traffic(results, {cid: len(request) for cid in sampled})
        vectors, used = self._combine("extract", 0, updates, shape, self.vector_strategy, None, dropped, traffic)
        broadcast = wire.encode({"vectors": vectors})
        # every client that computed vectors gets the global ones (a rejected client may still calibrate)
        receivers = [u.client_id for u in updates if u.client_id in self.alive]
        acks, lost = self._call("broadcast", 0, "set_global_vectors", {cid: broadcast for cid in receivers})
        dropped.update(lost)
        for cid in acks:
            traffic["down"][cid] += len(broadcast)
        answered = [u.client_id for u in used]
        record = RoundRecord(
            round=0,
            clients_sampled=sampled,
            clients_answered=answered,
            dropped=dropped,
            mean_loss=None,
            bytes_up=[traffic["up"][c] for c in answered],
            bytes_down=[traffic["down"][c] for c in sampled],
            seconds=time.monotonic() - start,
        )
        self._record(record)
        return vectors

    def stage_two_round(self, round_index: int, coefficients: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        start = time.monotonic()
        s = self.settings
        sampled = self.coefficient_strategy.configure(sorted(self.alive), s.fraction, s.min_clients, rng)
        config = dataclasses.asdict(
            dataclasses.replace(s.calibration, epochs=s.local_epochs, round_index=round_index, rounds_total=s.rounds)
        )
        payload = wire.encode(
            {"coefficients": coefficients},
            round=round_index,
            seed=s.seed + round_index,
            config=config,
            secagg=s.secagg,
            weighted=s.weighted_coefficients,
        )
        results, dropped = self._call("calibrate", round_index, "calibrate", {cid: payload for cid in sampled})
        updates = self._decode_updates(results, "coefficients", coefficients.shape, dropped)
        self._require(len(updates), f"round {round_index}")
        traffic = _traffic(results, {cid: len(payload) for cid in sampled})
        new, used = self._combine(
            "calibrate",
            round_index,
            updates,
            coefficients.shape,
            self.coefficient_strategy,
            coefficients,
            dropped,
            traffic,
        )
        self._record_round(round_index, sampled, used, dropped, traffic, start)
        return new

    def _record_round(
        self,
        round_index: int,
        sampled: list[int],
        used: list[ClientUpdate],
        dropped: dict[int, str],
        traffic: dict,
        start: float,
    ) -> None:
        """Record a calibration round from the updates it aggregated."""
        losses = [u.loss for u in used if u.loss is not None]
        self._record(
            RoundRecord(
                round=round_index,
                clients_sampled=sampled,
                clients_answered=[u.client_id for u in used],
                dropped=dropped,
                mean_loss=float(np.mean(losses)) if losses else None,
                bytes_up=[traffic["up"][u.client_id] for u in used],
                bytes_down=[traffic["down"][c] for c in sampled],
                seconds=time.monotonic() - start,
            )
        )

    def _record(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        self.store.record_round(self.run_id, record)
        _log_event(
            "round",
            run=self.run_id,
            round=record.round,
            sampled=len(record.clients_sampled),
            answered=len(record.clients_answered),
            dropped=record.dropped,
            mean_loss=record.mean_loss,
            bytes_up=sum(record.bytes_up),
            bytes_down=sum(record.bytes_down),
            bytes_up_per_client=max(record.bytes_up, default=0),
            seconds=round(record.seconds, 3),
        )

    # ------------------------------------------------------------------ evaluation and summary
    def _evaluate(self, vectors: np.ndarray, coefficients: np.ndarray) -> dict:
        test = self.data.test
        if not len(test):
            return {}
        model = self._driver_model or load_model(self.model_id, self.settings.dtype)
        ctx = HFContextModel(model)
        try:
            task = self.data.task
            return {
                "dtype": self.settings.dtype,  # what the accuracies below were scored in
                "test_examples": len(test),
                "zero_shot_accuracy": accuracy(ctx, self.tokenizer, task, test),
                "accuracy": accuracy(ctx, self.tokenizer, task, test, vectors, coefficients),
            }
        finally:
            ctx.remove_hooks()

    def _privacy_summary(self) -> dict:
        """Settings, noise multipliers and ε spent (worst case over clients: the most rounds any one answered)."""
        participation = {}
        for r in self.rounds[1:]:
            for cid in r.clients_answered:
                participation[cid] = participation.get(cid, 0) + 1
        report = privacy_report(self.settings.privacy, self.privacy, max(participation.values(), default=0))
        report["secagg"] = self.settings.secagg
        return report

    def _summary(self, started: float) -> dict:
        per_round = [
            {
                "round": r.round,
                "answered": len(r.clients_answered),
                "bytes_up_per_client": r.bytes_up,
                "bytes_down_per_client": r.bytes_down,
                "mean_loss": r.mean_loss,
                "client_seconds": {
                    stage: {str(c): v for c, v in by_client.items()}
                    for stage, by_client in self.client_compute.get(r.round, {}).items()
                },
            }
            for r in self.rounds
        ]
        stage2 = [r for r in self.rounds if r.round > 0]
        return {
            **self._compute_summary(),
            "seconds": round(time.monotonic() - started, 3),
            "clients": self.settings.clients,
            "shard_sizes": [len(s) for s in self.shards],
            "stage1_bytes_up_per_client": max(self.rounds[0].bytes_up, default=0),
            "stage1_bytes_down_per_client": max(self.rounds[0].bytes_down, default=0),
            "round_bytes_up_per_client": max((b for r in stage2 for b in r.bytes_up), default=0),
            "round_bytes_down_per_client": max((b for r in stage2 for b in r.bytes_down), default=0),
            "total_bytes_up": sum(sum(r.bytes_up) for r in self.rounds),
            "total_bytes_down": sum(sum(r.bytes_down) for r in self.rounds),
            "rounds": per_round,
            "aggregation": {
                "aggregator": self.settings.aggregator,
                "trim_fraction": self.settings.trim_fraction,
                "reject_norm_factor": 0.0 if self.settings.secagg else self.settings.reject_norm_factor,
                "secagg": self.settings.secagg,
            },
            "rejected": {
                str(r.round): {str(c): why for c, why in r.dropped.items() if why.startswith("rejected")}
                for r in self.rounds
                if any(why.startswith("rejected") for why in r.dropped.values())
            },
            "privacy": self._privacy_summary(),
        }

    def _compute_summary(self) -> dict:
        """Client-reported compute, summed: per run, per stage and per client (CPU and wall seconds).

        Measured inside each actor around each request (:mod:`ifedicl.federation_job.compute`); what a
        client spent on a request it never answered (it died or timed out) is not known here.
        """
        reports = [
            (stage, cid, report)
            for by_stage in self.client_compute.values()
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

    # ------------------------------------------------------------------ run
    def _run_settings(self) -> dict:
        """What the run row records as its settings."""
        return {
            "method": "ifedicl",
            **self.settings.to_dict(),
            "source": dataclasses.asdict(self.source),
            "driver": liveness.driver_identity(),
            "client_privacy": dataclasses.asdict(self.privacy),
        }

    def _stages(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The method's client stages and store writes -> (vectors, final Λ). IFed-ICL: stage 1, then R rounds."""
        vectors = self.stage_one()
        self.store.write_vectors(self.run_id, self.data.task.name, vectors)
        coefficients = initial_coefficients(self.fingerprint.num_layers).numpy()
        self.store.write_coefficients(self.run_id, self.data.task.name, 0, coefficients)
        rng = np.random.default_rng(self.settings.seed)
        for r in tqdm(range(1, self.settings.rounds + 1), desc="rounds", unit="round"):
            coefficients = self.stage_two_round(r, coefficients, rng)
            self.store.write_coefficients(self.run_id, self.data.task.name, r, coefficients)
        return vectors, coefficients

    def run(self, publish: bool = False) -> FederationResult:
        started = time.monotonic()
        settings = self._run_settings()
        liveness.ensure_writable(self.store_uri)  # fail before any work, not halfway through
        self.store = Store(self.store_uri, create=True)
        for run_id, reason in liveness.reap_dead_runs(self.store).items():
            _log_event("run_reaped", run=run_id, reason=reason)
        we_started_ray = ensure_ray()
        self.run_id = self.store.start_run(self.data.task, self.fingerprint, settings)
        _log_event("run_started", run=self.run_id, task=self.data.task.name, model=self.model_id)
        try:
            self._start_actors()
            vectors, coefficients = self._stages()
            self._kill_actors()
            summary = self._summary(started)
            summary.update(self._evaluate(vectors, coefficients))
            self.store.finish_run(self.run_id, summary)
            if publish:
                self.store.publish(self.run_id)
            _log_event("run_finished", run=self.run_id, published=publish)
            try:  # housekeeping: servers' cold loads stay ~10 ms however many runs pile up
                self.store.optimize()
            except Exception as err:  # the run is complete either way
                _log_event("store_optimize_failed", run=self.run_id, error=str(err))
            return FederationResult(self.run_id, publish, coefficients, vectors, self.rounds, summary)
        except BaseException as err:
            try:
                self.store.fail_run(self.run_id, f"{type(err).__name__}: {err}")
            except Exception as store_err:  # e.g. the store went read-only: keep the original error
                _log_event("fail_run_failed", run=self.run_id, error=str(store_err))
            raise
        finally:
            self._kill_actors()
            if we_started_ray:
                ray.shutdown()

    def _kill_actors(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
