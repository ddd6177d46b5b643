"""Ray plumbing: start the client actors, call them with a deadline, gather answers and drops.

Why apart from the round loop: everything here is about processes (who is alive, who
answered in time, what each answer cost the client), nothing about the method. A client
that dies, fails or does not answer by the deadline -- stuck, not only dead -- is dropped
from the request with its reason and never asked again in the run.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm.auto import tqdm

from ifedicl.federation_job import compute, wire
from ifedicl.federation_job.actors import ClientActor
from ifedicl.federation_job.exchange import Exchange, log_event
from ifedicl.kernel.modeling import load_shared_weights, model_from_weights

# Quiet library chatter inside actors; progress is reported by the driver.
ACTOR_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Called after each stage's requests are dispatched (stage, round, {client: actor}); chaos tests kill actors here.
DispatchHook = Callable[[str, int, dict], None]
# Called after each stage's answers are gathered (stage, round, {client: payload bytes}, {client: actor}).
GatherHook = Callable[[str, int, dict, dict], None]
# What each client reported it spent per request: {round: {stage: {client: {"cpu_s", "wall_s"}}}}
ClientCompute = dict[int, dict[str, dict[int, dict[str, float]]]]


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray. Returns True if we started it."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": ACTOR_ENV}, logging_level=logging.WARNING)
    else:
        # A local Ray's workers inherit this process's environment, so no runtime env is needed, and the
        # workers Ray starts with it can host clients (a runtime env needs fresh ones: ~1 core-second each).
        for name, value in ACTOR_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    return True


def gather(calls: dict[int, ray.ObjectRef], timeout_s: float, desc: str) -> tuple[dict[int, object], dict[int, str]]:
    """Wait for each client's answer until the deadline; failures become recorded drops."""
    pending = {ref: cid for cid, ref in calls.items()}
    results: dict[int, object] = {}
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


def put_shared_weights(model_id: str, dtype: str) -> tuple[ray.ObjectRef, object]:
    """The weights as one object-store copy per node -> (its ref, a driver-side model aliasing it).

    The driver loads them itself and puts them into its node's object store; its private copy dies
    with that call (the exported buffers were its only references). The model returned for the final
    evaluation aliases the object-store copy, so the node holds one copy of the weights in all. A loader
    task would cost a fresh worker process importing torch and transformers (~8 s a run on 2 cores).
    """
    ref = ray.put(load_shared_weights(model_id, dtype))
    gc.collect()  # the loaded module's reference cycles, which still hold the private copy's tensors
    return ref, model_from_weights(ray.get(ref))


class WarmActors:
    """Client actors kept between the runs of one driver process, each emptied of its last client.

    Why: on CPUs a fresh client actor costs ~9 core-seconds before it computes anything (a Ray worker
    process importing torch and transformers; nearly all of a tiny model's client, ~12 s of
    SmolLM2's on 2 cores), and a driver that federates many times in one Ray (the report, the
    ablations, a test session) paid it for every client of every run. A kept actor still holds the
    Ray resources it was created with, so it serves only a run asking for the same options; the
    others are killed before that run starts new ones. Handles from an earlier Ray are forgotten.
    """

    LEAVE_TIMEOUT_S = 30.0  # an actor that cannot drop its client in this long is killed, not kept
    PING_TIMEOUT_S = 10.0  # a kept actor that does not answer in this long (it died idle) is replaced

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[tuple[tuple, ray.actor.ActorHandle]] = []  # (options key, actor)
        self._ray = ""  # the Ray the handles belong to

    @staticmethod
    def _key(options: dict) -> tuple:
        return tuple(sorted(options.items()))

    def _current(self) -> None:
        """Forget handles from a Ray this process has since left (they died with it)."""
        context = ray.get_runtime_context()
        session = f"{context.gcs_address}/{context.get_node_id()}"
        if session != self._ray:
            self._idle, self._ray = [], session

    def held_cpus(self) -> float:
        """CPUs the kept actors that still answer hold (a dead one's are Ray's again)."""
        with self._lock:
            self._current()
            alive = set(
                _answering({actor.__ray_ready__.remote(): actor for _, actor in self._idle}, self.PING_TIMEOUT_S)
            )
            self._idle = [(key, actor) for key, actor in self._idle if actor in alive]
            return sum(dict(key).get("num_cpus") or 0.0 for key, _ in self._idle)

    def take(self, options: dict, count: int) -> list[ray.actor.ActorHandle]:
        """Up to ``count`` kept actors created with ``options`` that still answer; every other one is killed."""
        with self._lock:
            self._current()
            key = self._key(options)
            matching = [actor for k, actor in self._idle if k == key]
            for k, actor in self._idle:
                if k != key:
                    ray.kill(actor)
            self._idle = []
        for actor in matching[count:]:
            ray.kill(actor)
        return _answering({actor.__ray_ready__.remote(): actor for actor in matching[:count]}, self.PING_TIMEOUT_S)

    def keep(self, options: dict, actors: list[ray.actor.ActorHandle]) -> None:
        """Keep the actors that drop their client in time; kill the others."""
        kept = _answering({actor.leave.remote(): actor for actor in actors}, self.LEAVE_TIMEOUT_S)
        with self._lock:
            self._current()
            self._idle += [(self._key(options), actor) for actor in kept]


def _answering(calls: dict[ray.ObjectRef, ray.actor.ActorHandle], timeout_s: float) -> list[ray.actor.ActorHandle]:
    """The actors whose call succeeded within ``timeout_s``; the others are killed."""
    done, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s) if calls else ([], [])
    answered = []
    for ref in done:
        try:
            ray.get(ref)
            answered.append(calls[ref])
        except (RayActorError, RayTaskError):
            ray.kill(calls[ref])
    for ref in late:
        ray.kill(calls[ref])
    return answered


WARM = WarmActors()  # one per driver process


class ClientPool:
    """The run's client actors: who is alive, requests with a deadline, and what clients reported spending."""

    def __init__(
        self,
        timeout_s: float,
        after_dispatch: DispatchHook | None = None,
        after_gather: GatherHook | None = None,
    ):
        self.timeout_s = timeout_s
        self.after_dispatch = after_dispatch
        self.after_gather = after_gather
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.alive: set[int] = set()
        self.honest: set[int] = set()  # clients that may be kept warm (not adversaries)
        self.options: dict = {}  # the Ray options the actors were created with
        self.compute: ClientCompute = {}
        self.session = ""  # the run id, once the run has one (secure aggregation binds masks to it)

    def start(
        self, client_args: dict[int, tuple], options: dict, adversaries: dict[int, str], load_timeout_s: float
    ) -> dict[int, str]:
        """One :class:`ClientActor` per client, each loading the model; -> {client: reason} for those not ready in time.

        ``client_args``: each client's constructor arguments; ``options``: Ray's resource options;
        ``adversaries``: clients that run :class:`AdversarialClientActor` in that mode (drills, tests).
        """
        honest = [cid for cid in client_args if cid not in adversaries]
        warm = dict(zip(honest, WARM.take(options, len(honest))))
        calls = {}
        for cid, args in client_args.items():
            if cid in warm:
                self.actors[cid] = warm[cid]
                calls[cid] = warm[cid].rejoin.remote(*args)
                continue
            if cid in adversaries:
                from ifedicl.federation_job.adversary import AdversarialClientActor

                evil = ray.remote(AdversarialClientActor).options(**options)
                self.actors[cid] = evil.remote(*args, adversary=adversaries[cid])
            else:
                self.actors[cid] = ray.remote(ClientActor).options(**options).remote(*args)
            calls[cid] = self.actors[cid].ready.remote()
        self.options, self.honest = options, set(honest)
        if self.after_dispatch is not None:
            self.after_dispatch("load", 0, dict(self.actors))
        ready, dropped = gather(calls, load_timeout_s, "loading clients")
        self.alive = set(ready)
        for cid, reason in dropped.items():
            log_event("client_dropped", stage="load", client=cid, reason=reason)
        return {cid: f"{reason} (while loading)" for cid, reason in dropped.items()}

    def call(self, stage: str, round_index: int, method: str, requests: dict[int, bytes]) -> Exchange:
        """``method(request)`` on each addressed client; whoever is not back by the deadline is dropped."""
        calls = {cid: getattr(self.actors[cid], method).remote(p) for cid, p in requests.items()}
        if self.after_dispatch is not None:
            self.after_dispatch(stage, round_index, {cid: self.actors[cid] for cid in calls})
        results, dropped = gather(calls, self.timeout_s, f"{stage} r{round_index}")
        for cid, payload in results.items():
            self._note_compute(stage, round_index, cid, payload)
        if self.after_gather is not None:
            self.after_gather(stage, round_index, dict(results), {cid: self.actors[cid] for cid in calls})
        for cid, reason in dropped.items():
            self.exclude(cid)  # dead or stuck: not asked again this run
            log_event("client_dropped", stage=stage, round=round_index, client=cid, reason=reason)
        return Exchange.of(requests, results, dropped)

    def exclude(self, client_id: int) -> None:
        self.alive.discard(client_id)

    def _note_compute(self, stage: str, round_index: int, cid: int, payload: object) -> None:
        """Keep the CPU and wall seconds a client reported in its answer's metadata (if it did)."""
        report = compute.reported(wire.meta_of(payload))
        if report is not None:
            self.compute.setdefault(round_index, {}).setdefault(stage, {})[cid] = report

    def stop(self, keep_warm: bool = False) -> None:
        """The run no longer needs its actors. With ``keep_warm`` (a completed run, in a Ray that outlives
        it) the honest clients still alive are kept for the next run (:class:`WarmActors`); every other
        actor (dropped, stuck, an adversary, or all of them after a failed run) is killed."""
        keep = self.alive & self.honest if keep_warm else set()
        for cid, actor in self.actors.items():
            if cid not in keep:
                ray.kill(actor)
        if keep:
            WARM.keep(self.options, [self.actors[cid] for cid in sorted(keep)])
        self.actors.clear()
        self.alive = set()
