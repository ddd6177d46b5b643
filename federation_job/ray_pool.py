"""Ray plumbing: lay the clients out on hosts, call them with a deadline, gather answers and drops.

Why apart from the round loop: everything here is about processes (which host serves which
client, who is alive, who answered in time, what each answer cost the client), nothing about
the method. A client that dies, fails or does not answer by the deadline -- stuck, not only
dead -- is dropped from the request with its reason and never asked again in the run.

Clients are virtual, as in Flower's simulation engine: a :class:`~ifedicl.federation_job.actors.ClientHost`
actor keeps one model and serves any number of clients one call after another, so the number
of processes is a setting (``--actors``), not the number of clients. Clients with a placement
are hosted on the nodes that have it; an adversary (drills, tests) gets a host of its own.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm.auto import tqdm

from ifedicl.federation_job import compute, wire
from ifedicl.federation_job.actors import ClientHost
from ifedicl.federation_job.exchange import Exchange, log_event
from ifedicl.kernel.errors import FederationError
from ifedicl.kernel.modeling import load_shared_weights, model_from_weights
from ifedicl.kernel.sources import ClientProfile

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


POLL_S = 0.05  # how often gather collects the answers that came back


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
            # Every ready answer at once, polled: a wait for one at a time costs O(clients) per answer, which a
            # thousand virtual clients turn into seconds of driver time per round.
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=min(left, POLL_S), fetch_local=False)
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


@dataclass(frozen=True)
class HostPlan:
    """One host actor to start: the clients it serves, where it must run, and (drills) its adversary mode."""

    clients: tuple[int, ...]
    placement: str | None = None
    adversary: str = ""


def plan_hosts(
    placements: dict[int, str | None], adversaries: dict[int, str], hosts: int | None
) -> list[HostPlan]:
    """Which host serves which client: each adversary alone; the others, per placement, spread round-robin
    over that placement's share of ``hosts`` (None: one host per client), at least one host per placement."""
    honest = [cid for cid in sorted(placements) if cid not in adversaries]
    groups: dict[str | None, list[int]] = {}
    for cid in honest:
        groups.setdefault(placements[cid], []).append(cid)
    plans = []
    for placement, members in groups.items():
        share = len(members) if hosts is None else max(1, round(hosts * len(members) / max(1, len(honest))))
        share = min(share, len(members))
        plans += [HostPlan(tuple(members[i::share]), placement) for i in range(share)]
    plans += [HostPlan((cid,), placements[cid], adversaries[cid]) for cid in sorted(adversaries) if cid in placements]
    return plans


def placement_options(placement: str | None) -> dict:
    """Ray actor options that pin a host to the nodes holding its clients' data.

    ``label:KEY=VALUE`` is a node label (``ray start --labels KEY=VALUE``); ``resource:NAME`` or a bare
    ``NAME`` is a custom resource (``ray start --resources '{"NAME": 1}'``), of which each host takes a
    sliver, so one node can host many.
    """
    if not placement:
        return {}
    kind, _, value = placement.partition(":")
    if kind == "label" and "=" in value:
        key, _, wanted = value.partition("=")
        return {"label_selector": {key.strip(): wanted.strip()}}
    name = value if kind == "resource" else placement
    if not name or kind == "label":
        raise FederationError(f"placement {placement!r}: use label:KEY=VALUE, resource:NAME or NAME")
    return {"resources": {name: 0.001}}


def placement_exists(placement: str) -> bool:
    """Whether any alive node of the Ray cluster offers ``placement`` (checked before a run starts)."""
    wanted = placement_options(placement)
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        if "resources" in wanted and set(wanted["resources"]) <= set(node.get("Resources", {})):
            return True
        labels = node.get("Labels", {}) or {}
        if "label_selector" in wanted and all(labels.get(k) == v for k, v in wanted["label_selector"].items()):
            return True
    return False


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
        """Hashable options (a placement's are nested dicts): JSON per value."""
        return tuple(sorted((name, json.dumps(value, sort_keys=True)) for name, value in options.items()))

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
            return sum(json.loads(dict(key).get("num_cpus", "null")) or 0.0 for key, _ in self._idle)

    def take(self, wanted: list[tuple[dict, int]]) -> list[list[ray.actor.ActorHandle]]:
        """For each (options, count): up to ``count`` kept actors created with those options that still answer.
        Every other kept actor is killed (it holds resources no host of this run asks for)."""
        with self._lock:
            self._current()
            idle, self._idle = self._idle, []
        chosen: list[list[ray.actor.ActorHandle]] = []
        for options, count in wanted:
            key = self._key(options)
            matching = [actor for k, actor in idle if k == key][:count]
            idle = [(k, actor) for k, actor in idle if actor not in matching]
            chosen.append(matching)
        for _, actor in idle:
            ray.kill(actor)
        return [
            _answering({actor.__ray_ready__.remote(): actor for actor in matching}, self.PING_TIMEOUT_S)
            for matching in chosen
        ]

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
    """The run's clients on their hosts: who is alive, requests with a deadline, what clients reported spending."""

    def __init__(
        self,
        timeout_s: float,
        after_dispatch: DispatchHook | None = None,
        after_gather: GatherHook | None = None,
    ):
        self.timeout_s = timeout_s
        self.after_dispatch = after_dispatch
        self.after_gather = after_gather
        self.actors: dict[int, ray.actor.ActorHandle] = {}  # client -> its host (many clients share one)
        self.alive: set[int] = set()
        self.profiles: dict[int, ClientProfile] = {}  # what each joined client said of its data (counts)
        self.hosts: list[tuple[dict, ray.actor.ActorHandle, bool]] = []  # (options, host, honest)
        self.broken: set[ray.actor.ActorHandle] = set()  # hosts that died or sat on a request past its deadline
        self.compute: ClientCompute = {}
        self.session = ""  # the run id, once the run has one (secure aggregation binds masks to it)

    def start(
        self, plans: list[HostPlan], host_args: tuple, join_args: dict[int, tuple], options: dict, load_timeout_s: float
    ) -> dict[int, str]:
        """Start the hosts ``plans`` lay out (each loading the model), then every client joins its host, reading
        its own data there. -> {client: reason} for those that could not join (bad data, a host that failed)."""
        host_options = [{**options, **placement_options(plan.placement)} for plan in plans]
        honest = [i for i, plan in enumerate(plans) if not plan.adversary]
        wanted: dict[tuple, list[int]] = {}
        for i in honest:
            wanted.setdefault(WarmActors._key(host_options[i]), []).append(i)
        taken = WARM.take([(host_options[ix[0]], len(ix)) for ix in wanted.values()])
        warm = {i: actor for ix, actors in zip(wanted.values(), taken) for i, actor in zip(ix, actors)}
        calls = {}
        for i, plan in enumerate(plans):
            if i in warm:
                host = warm[i]
                host.rejoin.remote(*host_args)  # queued before the joins below: they run on the new model
            else:
                host = ray.remote(ClientHost).options(**host_options[i]).remote(*host_args)
            self.hosts.append((host_options[i], host, not plan.adversary))
            for cid in plan.clients:
                self.actors[cid] = host
                calls[cid] = host.join.remote(cid, *join_args[cid], adversary=plan.adversary)
        if self.after_dispatch is not None:
            self.after_dispatch("load", 0, dict(self.actors))
        joined, dropped = gather(calls, load_timeout_s, "loading clients")
        for cid, payload in joined.items():
            try:
                self.profiles[cid] = _profile(payload)
            except (ValueError, TypeError, KeyError) as err:
                dropped[cid] = f"rejected profile: {err}"
        self._note_broken(dropped)
        self.alive = set(self.profiles)
        for cid, reason in dropped.items():
            log_event("client_dropped", stage="load", client=cid, reason=reason)
        return {cid: f"{reason} (while loading)" for cid, reason in dropped.items()}

    def call(self, stage: str, round_index: int, method: str, requests: dict[int, bytes]) -> Exchange:
        """``method(request)`` on each addressed client; whoever is not back by the deadline is dropped."""
        calls = {cid: self.actors[cid].call.remote(method, cid, p) for cid, p in requests.items()}
        if self.after_dispatch is not None:
            self.after_dispatch(stage, round_index, {cid: self.actors[cid] for cid in calls})
        results, dropped = gather(calls, self.timeout_s, f"{stage} r{round_index}")
        for cid, payload in results.items():
            self._note_compute(stage, round_index, cid, payload)
        if self.after_gather is not None:
            self.after_gather(stage, round_index, dict(results), {cid: self.actors[cid] for cid in calls})
        self._note_broken(dropped)
        for cid, reason in dropped.items():
            self.exclude(cid)  # dead or stuck: not asked again this run
            log_event("client_dropped", stage=stage, round=round_index, client=cid, reason=reason)
        return Exchange.of(requests, results, dropped)

    def exclude(self, client_id: int) -> None:
        self.alive.discard(client_id)

    def _note_broken(self, dropped: dict[int, str]) -> None:
        """A host that died or sat on a request past its deadline is not reused (a failed request is not that)."""
        for cid, reason in dropped.items():
            if not reason.startswith(("client failed", "rejected")):
                self.broken.add(self.actors[cid])

    def _note_compute(self, stage: str, round_index: int, cid: int, payload: object) -> None:
        """Keep the CPU and wall seconds a client reported in its answer's metadata (if it did)."""
        report = compute.reported(wire.meta_of(payload))
        if report is not None:
            self.compute.setdefault(round_index, {}).setdefault(stage, {})[cid] = report

    def stop(self, keep_warm: bool = False) -> None:
        """The run no longer needs its hosts. With ``keep_warm`` (a completed run, in a Ray that outlives it)
        the honest hosts that never broke are kept for the next run (:class:`WarmActors`); every other host
        (dead, stuck, an adversary's, or all of them after a failed run) is killed."""
        kept: dict[tuple, tuple[dict, list]] = {}
        for options, host, honest in self.hosts:
            if keep_warm and honest and host not in self.broken:
                kept.setdefault(WarmActors._key(options), (options, []))[1].append(host)
            else:
                ray.kill(host)
        for options, hosts in kept.values():
            WARM.keep(options, hosts)
        self.hosts, self.actors, self.broken = [], {}, set()
        self.alive = set()


def _profile(payload: object) -> ClientProfile:
    """A joining client's profile from its answer, checked: counts that are whole, non-negative and add up."""
    meta = wire.meta_of(payload)
    examples, counts, test = meta["examples"], meta["class_counts"], meta["test_examples"]
    if not all(type(v) is int and 0 <= v <= wire.MAX_EXAMPLES for v in [examples, test, *counts]):
        raise ValueError(f"example counts must be integers in 0..{wire.MAX_EXAMPLES}")
    if examples < 1 or sum(counts) != examples:
        raise ValueError(f"per-class counts {counts} do not add up to its {examples} examples")
    return ClientProfile(examples, tuple(counts), test)
