"""The federation driver: start clients, stage 1 (vectors), R rounds of stage 2 (Λ), record, publish.

Runs on a local Ray it starts itself, or unchanged under ``ray job submit`` /
``RAY_ADDRESS`` on an existing cluster. Only this process writes to the store.
A client that dies, fails or is stuck past ``round_timeout_s`` is dropped from the round
and recorded (:mod:`~ifedicl.federation_job.ray_pool`); a round left with fewer than
``min_clients`` fails the run cleanly, nothing published (the strategy's failure policy).

Each round: the strategy configures it (clients, upload instructions), the clients answer,
the strategy aggregates (:mod:`~ifedicl.federation_job.strategies`: FedAvg, robust rules
behind a norm screen, or secure aggregation, where the server only ever sees the cohort's
sum); the round's one record is written here. Clients may clip and noise what they upload
(:mod:`~ifedicl.federation_job.privacy`). A run whose driver dies is reaped by the next run
(:mod:`~ifedicl.federation_job.liveness`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import ray
from tqdm.auto import tqdm

from ifedicl.federation_job import liveness, wire
from ifedicl.federation_job.class_balanced import check_class_upload, pooled_mean
from ifedicl.federation_job.early_stopping import EarlyStopping, pooled_holdout_loss
from ifedicl.federation_job.exchange import RoundOutcome, log_event, log_round
from ifedicl.federation_job.federation_settings import FederationSettings, build_strategies
from ifedicl.federation_job.population import Population
from ifedicl.federation_job.privacy import ClientPrivacy
from ifedicl.federation_job.ray_pool import (
    WARM,
    ClientPool,
    DispatchHook,
    GatherHook,
    ensure_ray,
    placement_exists,
    plan_hosts,
    put_shared_weights,
)
from ifedicl.federation_job.run_summary import federated_accuracy, held_out_accuracy, summarize
from ifedicl.federation_job.second_order import TrustRegionNewton
from ifedicl.federation_job.strategies import Aggregate, ClientUpdate, RoundId
from ifedicl.federation_job.vector_coding import decode_vectors, upload_reader
from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_config, load_model, load_tokenizer
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import label_token_ids
from ifedicl.model_patches.injection import initial_coefficients
from ifedicl.storage.records import RoundRecord
from ifedicl.storage.store import Store

__all__ = ["Federation", "FederationResult", "FederationSettings", "ensure_ray"]

# Ray starts helper processes with fork+exec (subprocess); the child execs at once and never
# touches LanceDB's runtime, so LanceDB's generic fork warning does not apply here.
warnings.filterwarnings("ignore", message="lancedb fork support is experimental")


@dataclass
class ClassUpload(ClientUpdate):
    """A class-balanced stage-1 upload: ``values`` are the client's class means [C, L, 2, d]."""

    counts: np.ndarray | None = None  # [C] its examples per class


@dataclass
class FederationResult:
    run_id: str
    published: bool
    coefficients: np.ndarray | None  # [L, 2, 2]; None for a FedAvg-LoRA run
    vectors: np.ndarray | None  # [L, 2, d]; None for a FedAvg-LoRA run
    rounds: list[RoundRecord]
    summary: dict


class Federation:
    """One federation run: the clients, the strategies, the round loop and the store writes."""

    def __init__(
        self,
        model_id: str,
        clients: Population | DataSource,
        store_uri: str,
        settings: FederationSettings,
        after_dispatch: DispatchHook | None = None,
        after_gather: GatherHook | None = None,
    ):
        """``clients``: a :class:`Population` (clients with their own data), or one data set to split over
        ``settings.clients`` simulated clients (Dirichlet ``settings.alpha``, :meth:`Population.simulate`)."""
        if isinstance(clients, DataSource):
            settings.validate()  # before the split: its errors name the flags
            clients = Population.simulate(clients, settings.clients, settings.alpha, settings.seed, settings.min_shard)
        else:
            settings = dataclasses.replace(settings, clients=len(clients.clients))
        settings.validate()
        self.model_id = canonical_model_id(model_id)
        self.population = clients
        self.task = clients.task
        self.settings = settings
        self.privacy: ClientPrivacy = settings.privacy.client_policy(settings.rounds)
        self.pool = ClientPool(settings.round_timeout_s, after_dispatch, after_gather)
        self.strategies = build_strategies(settings, self.pool, len(self.task.labels))
        self.tokenizer = load_tokenizer(model_id)
        label_token_ids(self.task, self.tokenizer)  # fail early on labels sharing a first token
        self.fingerprint = fingerprint(self.model_id, load_config(model_id))
        self.start_coefficients = initial_coefficients(self.fingerprint.num_layers).numpy()  # [L, 2, 2]
        # scored by the clients beside this run's Λ in federated evaluation (a recalibration's live run)
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self.store_uri = store_uri
        self.store: Store | None = None  # opened in run(), after Ray has forked its processes
        self.rounds: list[RoundRecord] = []
        self.load_dropped: dict[int, str] = {}  # recorded with round 0
        self.releases: dict[int, int] = {}  # Λ uploads each client made (used or rejected): what DP accounts
        self._driver_model = None
        self.shared_weights: ray.ObjectRef | None = None  # --weights shared: the object each node keeps one copy of
        self.server_state_resume: dict | None = None  # whether a warm start continued a stored optimizer state
        self.early_stopping: dict | None = None  # what early stopping saw and decided (the run summary's)

    def start_from(self, coefficients: np.ndarray, server_state: dict[str, np.ndarray] | None = None) -> None:
        """Stage 2 starts from ``coefficients`` [L, 2, 2] instead of the initial Λ (λ=0.1, β=1): a recalibration
        warm-starts from the live run's, and with ``server_state`` (the live run's stored server optimizer state)
        continues its optimizer. A state that does not fit this run (another shape, not finite) is not used:
        the optimizer starts afresh and the run's summary says why (``server_optimizer_resume``)."""
        start = np.asarray(coefficients, dtype=np.float32)
        expected = self.start_coefficients.shape
        if start.shape != expected or not np.all(np.isfinite(start)):
            raise IfediclError(
                f"the starting Λ must be finite with shape {expected} for this model (got {start.shape})"
            )
        self.start_coefficients = start
        step = self.strategies.coefficients
        if server_state is None or step.state_arrays() is None:
            return
        try:
            step.resume(server_state, expected)
            self.server_state_resume = {"resumed": True}
        except IfediclError as err:
            self.server_state_resume = {"resumed": False, "reason": str(err)}
            log_event("server_state_refused", reason=str(err))

    @property
    def alive(self) -> set[int]:
        """Clients still in the run (loaded, never dropped)."""
        return self.pool.alive

    # ------------------------------------------------------------------ the run
    def run(self, publish: bool = False) -> FederationResult:
        started = time.monotonic()
        settings = self._run_settings()
        liveness.ensure_writable(self.store_uri)  # fail before any work, not halfway through
        self.store = Store(self.store_uri, create=True)
        for run_id, reason in liveness.reap_dead_runs(self.store).items():
            log_event("run_reaped", run=run_id, reason=reason)
        we_started_ray = ensure_ray()
        try:
            self._check_placements()
        except BaseException:
            if we_started_ray:
                ray.shutdown()
            raise
        self.run_id = self.pool.session = self.store.start_run(self.task, self.fingerprint, settings)
        log_event("run_started", run=self.run_id, task=self.task.name, model=self.model_id)
        try:
            self._start_clients()
            vectors, coefficients = self._stages()
            federated = self._federated_evaluation(vectors, coefficients)
            self.pool.stop(keep_warm=not we_started_ray)  # a Ray that outlives the run: its next run reuses them
            sizes = [p.examples for _, p in sorted(self.pool.profiles.items())]
            summary = summarize(
                self.rounds, self.pool.compute, self.settings, self.privacy, sizes, time.monotonic() - started,
                self.releases,
            )  # fmt: skip
            summary["client_names"] = {str(cid): name for cid, name in self.population.names.items()}
            if self.server_state_resume is not None:
                summary["server_optimizer_resume"] = self.server_state_resume
            if self.early_stopping is not None:
                summary["early_stopping"] = self.early_stopping
            if isinstance(self.strategies.coefficients, TrustRegionNewton):  # what --curvature auto chose
                trust_region = self.strategies.coefficients.settings
                summary["curvature"] = {"computed": trust_region.curvature, "memory": trust_region.memory}
                if trust_region.curvature_fraction < 1:
                    summary["curvature"]["fraction"] = trust_region.curvature_fraction
            summary.update(self._evaluate(vectors, coefficients))
            summary.update(federated)
            refused = self._publish_refusal(summary) if publish else None
            if refused:
                summary["publish_refused"] = refused
            self.store.finish_run(self.run_id, summary)
            published = publish and not refused
            if published:
                self.store.publish(self.run_id)
            log_event("run_finished", run=self.run_id, published=published, publish_refused=refused)
        except BaseException as err:
            try:
                self.store.fail_run(self.run_id, f"{type(err).__name__}: {err}")
            except Exception as store_err:  # e.g. the store went read-only: keep the original error
                log_event("fail_run_failed", run=self.run_id, error=str(store_err))
            raise
        finally:
            self.pool.stop()
            if we_started_ray:
                ray.shutdown()
        try:  # housekeeping, after the run is complete: servers' cold loads stay ~10 ms however many runs pile up
            self.store.optimize()
        except Exception as err:  # the run is complete either way
            log_event("store_optimize_failed", run=self.run_id, error=str(err))
        return FederationResult(self.run_id, published, coefficients, vectors, self.rounds, summary)

    def _publish_refusal(self, summary: dict) -> str | None:
        """Why this run must not be published, or None. Under secure aggregation the server never saw one
        client's Λ: a garbage sum within the value bound is caught only by what it does, so the run's held-out
        accuracy (the server's test set or the clients' pooled counts) must be there and not below zero-shot's."""
        if not self.settings.secagg:
            return None
        accuracy, zero_shot = summary.get("accuracy"), summary.get("zero_shot_accuracy")
        if accuracy is None or zero_shot is None:
            return "under --secagg a run is published only after a held-out evaluation (give a test split)"
        if accuracy < zero_shot:
            return f"held-out accuracy {accuracy:.4f} is below zero-shot's {zero_shot:.4f} (a bad aggregate?)"
        return None

    def _stages(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The method's rounds and store writes -> (vectors, final Λ). IFed-ICL: stage 1, then R rounds."""
        vectors, record = self.stage_one()
        self._record(record)
        self.store.write_vectors(self.run_id, self.task.name, vectors)
        coefficients = self.start_coefficients
        self.store.write_coefficients(self.run_id, self.task.name, 0, coefficients)
        rng = np.random.default_rng(self.settings.seed)
        stopping = EarlyStopping(self.settings.patience) if self.settings.holdout_fraction else None
        scored: dict[int, np.ndarray] = {}  # round -> the Λ the next round started from and scored: [L, 2, 2]
        states = {0: self._server_state()}  # round -> the rule's state that goes with that Λ
        for r in tqdm(range(1, self.settings.rounds + 1), desc="rounds", unit="round"):
            coefficients, record, (scored[r - 1], holdout_loss) = self.stage_two_round(r, coefficients, rng)
            states[r] = self._server_state()
            if stopping is not None:
                stopping.observe(r - 1, holdout_loss)
                if stopping.stop:  # this round ends the run on the Λ of the best held-out loss, recorded as its own
                    coefficients = scored[stopping.best_round]  # averaging: the rule's iterate, not the mean
                    states[r] = states[stopping.best_round]  # so a warm start measures the step that made it
            self._record(record)
            self.store.write_coefficients(self.run_id, self.task.name, r, coefficients)
            if states[r]:
                self.store.write_server_state(self.run_id, r, states[r])
            if stopping is not None and stopping.stop:
                log_event("early_stop", run=self.run_id, round=r, best_round=stopping.best_round)
                break
        if stopping is not None:
            self.early_stopping = stopping.summary(stopped_at=r if stopping.stop else None)
        return vectors, coefficients

    def _server_state(self) -> dict[str, np.ndarray] | None:
        """A copy of the round rule's state now (None or {}: it keeps none). Stored with each round: a
        recalibration continues it from the Λ that round published."""
        state = self.strategies.coefficients.state_arrays()
        return {name: np.array(value, copy=True) for name, value in state.items()} if state else state

    # ------------------------------------------------------------------ the rounds
    def _check_placements(self) -> None:
        """A client placed where no alive node offers its placement would wait forever: a one-line error first."""
        for client in self.population.clients:
            if client.placement and not placement_exists(client.placement):
                raise IfediclError(
                    f"client {client.name!r}: no alive Ray node offers placement {client.placement!r} "
                    "(a custom resource, or label:KEY=VALUE, given to the node that holds its data)"
                )

    def _start_clients(self) -> None:
        """Lay the clients out on hosts (``--actors``), start them, and let every client join with its own data."""
        s = self.settings
        clients = self.population.clients
        free = float(ray.available_resources().get("CPU", 0.0)) + WARM.held_cpus()  # absent: none free
        hosts = s.actors if s.actors is not None else max(1, int(free))  # default: one host per free CPU
        placements = {cid: client.placement for cid, client in enumerate(clients)}
        plans = plan_hosts(placements, s.adversaries, None if hosts >= len(clients) else hosts)
        cpus = s.cpus_per_client
        if cpus is None:  # the CPUs free for this run: those available and those its kept hosts hold
            cpus = max(0.01, math.floor(free / len(plans) * 1e4) / 1e4)  # Ray counts CPUs in units of 1e-4
        options = dict(num_cpus=cpus, num_gpus=s.gpus_per_client, max_restarts=0, max_task_retries=0)
        device = "cuda" if s.gpus_per_client > 0 else "cpu"
        model = self.model_id
        if s.weights == "shared":
            self.shared_weights, self._driver_model = put_shared_weights(self.model_id, s.dtype)
            model = self.shared_weights
        host_args = (model, self.model_id, s.dtype, device)
        join_args = {cid: (client, self.task, self.privacy) for cid, client in enumerate(clients)}
        timeout = s.load_timeout_s or s.round_timeout_s
        self.load_dropped = self.pool.start(plans, host_args, join_args, options, timeout)
        self.strategies.vectors.selection.require(len(self.alive), "loading")

    def _holdout(self) -> dict:
        """Early stopping's held-out split, in every request: its rows stay out of stage 1 and of every round."""
        s = self.settings
        return {"holdout": {"fraction": s.holdout_fraction, "seed": s.seed}} if s.holdout_fraction else {}

    def stage_one(self) -> tuple[np.ndarray, RoundRecord]:
        """Every client's context vectors, aggregated once and sent back to each client that made one."""
        started, s = time.monotonic(), self.settings
        strategy = self.strategies.vectors
        at = RoundId("extract", 0, "stage 1 (context vectors)")
        plan = strategy.configure(self.alive, np.random.default_rng(s.seed))  # all alive: stage 2's rng stays untouched
        coding = {} if s.vector_coding == "float32" else {"vector_coding": s.vector_coding}  # float32: as before
        balanced = {"stage1": s.stage1} if s.stage1 != "mean" else {}
        request = wire.encode(
            {}, batch_size=s.capture_batch_size, extract_dtype=s.extract_dtype, max_examples=s.stage1_examples,
            **coding, **balanced, **plan.instructions, **self._holdout(),
        )  # fmt: skip
        asked = self.pool.call(at.stage, at.index, "extract", plan.requests(request))
        shape = (self.fingerprint.num_layers, 2, self.fingerprint.hidden_size)
        if balanced:
            updates, rejected = self._class_uploads(asked.answers, shape)
            result = Aggregate(pooled_mean([(u.values, u.counts) for u in updates]), updates)
        else:
            decoded = strategy.decode(asked.answers, "vectors", shape, upload_reader(s.vector_coding))
            updates, rejected = self._as_joined(*decoded)
            result = strategy.aggregate(at, updates)
        broadcast = wire.encode({"vectors": result.value})
        # every client that computed vectors gets the global ones (a rejected client may still calibrate)
        receivers = [u.client_id for u in updates if u.client_id in self.alive]
        acks = self.pool.call("broadcast", 0, "set_global_vectors", {cid: broadcast for cid in receivers})
        for cid in sorted(self.alive - set(acks.answers)):  # no global vectors: nothing to calibrate or score with
            self.pool.exclude(cid)
        outcome = RoundOutcome.collect(
            0, plan.clients, result.used, started,
            dropped=[self.load_dropped, asked.dropped, rejected, result.dropped, acks.dropped],
            traffic=[asked.traffic, result.traffic, acks.traffic.only(acks.answers)],  # a lost broadcast is not counted
        )  # fmt: skip
        return result.value, outcome.record()

    def stage_two_round(
        self, round_index: int, coefficients: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, RoundRecord, tuple[np.ndarray, float | None]]:
        """One FedAvg round of Λ: the sampled clients calibrate from the global Λ (the rule's own, where it steps
        from another than the one published: ``RoundUpload.start``), the strategy combines them.
        -> (the Λ the round publishes, the round's record, (the Λ it started from, that Λ's pooled held-out loss:
        None without a held-out fraction))."""
        started, s = time.monotonic(), self.settings
        strategy = self.strategies.coefficients
        at = RoundId("calibrate", round_index, f"round {round_index}")
        plan = strategy.configure(self.alive, rng)
        config = dataclasses.replace(
            s.calibration, epochs=s.local_epochs, round_index=round_index, rounds_total=s.rounds
        )
        upload = strategy.round_upload(coefficients)
        start = coefficients if upload.start is None else upload.start  # [L, 2, 2] what the clients compute at
        request = wire.encode(
            {"coefficients": start, **upload.extra}, round=round_index, seed=s.seed + round_index,
            config=dataclasses.asdict(config), batch_size=s.capture_batch_size, **upload.meta, **plan.instructions,
            **self._holdout(),
        )  # fmt: skip
        asked = self.pool.call(at.stage, at.index, upload.method, plan.requests(request))
        for cid in asked.answers:  # a released upload spends privacy whether the server then uses it or not
            self.releases[cid] = self.releases.get(cid, 0) + 1
        updates, rejected = self._as_joined(*strategy.decode(asked.answers, upload.key, upload.shape, upload.read))
        result = strategy.aggregate(at, updates, reference=start)
        outcome = RoundOutcome.collect(
            round_index, plan.clients, result.used, started,
            dropped=[asked.dropped, rejected, result.dropped], traffic=[asked.traffic, result.traffic],
        )  # fmt: skip
        return result.value, outcome.record(), (start, pooled_holdout_loss(result.used))

    def _class_uploads(self, answers: dict[int, object], shape: tuple[int, ...]) -> tuple[list, dict[int, str]]:
        """Class-balanced stage 1's uploads -> checked (means [C, L, 2, d], counts [C]) per client; any upload
        that is not one (size, coding, shape, counts, values) is that client's recorded rejection."""
        classes = len(self.task.labels)
        limit = wire.upload_limit(classes * math.prod(shape) + classes, 3, 8)
        updates, rejected = [], {}
        for cid, payload in sorted(answers.items()):
            try:
                arrays, _ = wire.decode(wire.check_size(payload, limit, cid))
                counts = arrays.pop("class_counts")  # [C]
                flat = decode_vectors(arrays, self.settings.vector_coding)  # [C*L, 2, d]
                means = flat.reshape(classes, *shape) if flat.size == classes * math.prod(shape) else flat
                joined = self.pool.profiles[cid].examples
                check_class_upload(means, counts, shape, joined)
                updates.append(ClassUpload(cid, means, joined, counts=counts))
            except (IfediclError, KeyError, ValueError, TypeError) as err:
                rejected[cid] = f"rejected update: {err}"
        return updates, rejected

    def _as_joined(self, updates: list, rejected: dict[int, str]) -> tuple[list, dict[int, str]]:
        """Keep the uploads whose example count is the one their client joined with: weighted means (and the
        weighted masked sum) trust it, so a client claiming more would weigh itself up. Others: rejected."""
        kept = []
        for update in updates:
            joined = self.pool.profiles[update.client_id].examples
            if update.num_examples == joined:
                kept.append(update)
            else:
                claim = f"claims {update.num_examples} examples, joined with {joined}"
                rejected[update.client_id] = f"rejected update: {claim}"
        return kept, rejected

    # ------------------------------------------------------------------ records
    def _record(self, record: RoundRecord) -> None:
        """The one place a round is written: the run's list, the store, the log."""
        self.rounds.append(record)
        self.store.record_round(self.run_id, record)
        log_round(self.run_id, record)

    def _run_settings(self) -> dict:
        """What the run row records as its settings."""
        return {
            "method": "ifedicl",
            **self.settings.to_dict(),
            **self.population.origin,
            "driver": liveness.driver_identity(),
            "client_privacy": dataclasses.asdict(self.privacy),
        }

    def _evaluate(self, vectors: np.ndarray, coefficients: np.ndarray) -> dict:
        """Zero-shot and IFed-ICL accuracy on the server's own held-out set, if it has one (the simulation)."""

        def model():
            return self._driver_model or load_model(self.model_id, self.settings.dtype)

        return held_out_accuracy(model, self.tokenizer, self.task, self.population.server_test, self.settings.dtype,
                                 vectors, coefficients)  # fmt: skip

    def _federated_evaluation(self, vectors: np.ndarray | None, coefficients: np.ndarray | None) -> dict:
        """Each client with a held-out split scores the final Λ (and zero-shot, and :attr:`reference`) on it and
        returns per-class counts; pooled, they are the run's accuracy when the server holds no test set."""
        testers = sorted(cid for cid in self.alive if self.pool.profiles[cid].test_examples > 0)
        if coefficients is None or not testers:
            return {}
        arrays = {"coefficients": coefficients}
        if self.reference is not None:
            arrays.update(live_vectors=self.reference[0], live_coefficients=self.reference[1])
        request = wire.encode(arrays)
        asked = self.pool.call("evaluate", self.settings.rounds, "evaluate", {cid: request for cid in testers})
        report = federated_accuracy(
            asked.answers, {cid: self.pool.profiles[cid] for cid in testers}, self.population.names,
            len(self.task.labels), dict(asked.dropped),
        )  # fmt: skip
        evaluation = {"federated_evaluation": report}
        if not len(self.population.server_test) and report["pooled"]["test_examples"]:
            evaluation.update(report["pooled"], dtype=self.settings.dtype, evaluated_by="clients")
        return evaluation
