"""Killing a client actor so that the kill, not a race with its work, decides what the driver sees."""

from __future__ import annotations

import time

import ray


def kill_and_wait(actor, timeout_s: float = 30.0) -> None:
    """``ray.kill`` returns before the actor is gone; wait until a call to it fails as dead.

    Tests kill a client *between* stages with this (from an ``after_gather`` hook): a kill
    sent after a stage's dispatch races the call itself, and a tiny model's work often wins.
    """
    ray.kill(actor)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise TimeoutError(f"actor still answers {timeout_s} s after ray.kill")
