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
        self.compute: ClientCompute = {}
        self.session = ""  # the run id, once the run has one (secure aggregation binds masks to it)

    def start(
        self, client_args: dict[int, tuple], options: dict, adversaries: dict[int, str], load_timeout_s: float
    ) -> dict[int, str]:
        """One :class:`ClientActor` per client, each loading the model; -> {client: reason} for those not ready in time.

        ``client_args``: each client's constructor arguments; ``options``: Ray's resource options;
        ``adversaries``: clients that run :class:`AdversarialClientActor` in that mode (drills, tests).
        """
        for cid, args in client_args.items():
            if cid in adversaries:
                from ifedicl.federation_job.adversary import AdversarialClientActor

                evil = ray.remote(AdversarialClientActor).options(**options)
                self.actors[cid] = evil.remote(*args, adversary=adversaries[cid])
            else:
                self.actors[cid] = ray.remote(ClientActor).options(**options).remote(*args)
        calls = {cid: a.ready.remote() for cid, a in self.actors.items()}
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

    def stop(self) -> None:
        """Kill every actor (a stuck one included): the run no longer needs them."""
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
