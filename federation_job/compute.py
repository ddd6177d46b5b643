"""Client compute measured where it happens: CPU and wall seconds of one request, inside the actor.

Why process CPU time (``time.process_time``, i.e. ``CLOCK_PROCESS_CPUTIME_ID``): a client
actor is its own OS process and serves one request at a time (Ray's default
``max_concurrency=1``), but its work runs on several threads (torch's intra-op pool,
tokenizers), which a thread clock would miss. Process time counts them all; it also counts
the few milliseconds Ray's own threads in that process spend (receiving and sending the
request), which is compute the client does spend. ``resource.getrusage(RUSAGE_SELF)``
measures the same thing at coarser resolution. Wall seconds (``perf_counter``) are the
request's elapsed time inside the actor: on a shared machine they include waiting for a
core, which CPU seconds do not. On a GPU, CPU seconds miss device time; the wall time
covers it (results are copied to host memory before the clock stops).

The numbers travel back in the answer's wire metadata (``compute``) and the driver
records them per round and client (:meth:`ifedicl.federation_job.ray_pool.ClientPool._note_compute`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def measured() -> Iterator[dict[str, float]]:
    """``with measured() as compute: ...`` -> ``compute == {"cpu_s": ..., "wall_s": ...}`` after the block."""
    out: dict[str, float] = {}
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield out
    finally:
        out["cpu_s"] = round(time.process_time() - cpu, 4)
        out["wall_s"] = round(time.perf_counter() - wall, 4)


def reported(meta: dict) -> dict[str, float] | None:
    """A client's ``compute`` report from an answer's metadata, or None if absent or malformed."""
    compute = meta.get("compute")
    if not isinstance(compute, dict):
        return None
    try:
        cpu, wall = float(compute["cpu_s"]), float(compute["wall_s"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(cpu) and math.isfinite(wall) and cpu >= 0 and wall >= 0):
        return None
    return {"cpu_s": cpu, "wall_s": wall}
