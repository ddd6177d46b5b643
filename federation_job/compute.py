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


# The most seconds one request may report (~116 days): far beyond any round timeout, and small enough
# that a run's sums of them stay finite. A report is the client's own word, so it is checked like any upload.
MAX_SECONDS = 1e7
KEYS = ("cpu_s", "wall_s")


def finite_number(value: object) -> float | None:
    """``value`` as a finite float if it is a real number (not a bool, not a string), else None.

    JSON from a client can carry ``1e400`` (read as inf), a 400-digit integer (``float()`` of it raises
    OverflowError), ``"x"`` or ``true``; none of them is a number the server may compute with.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse(compute: object) -> dict[str, float]:
    """A ``compute`` report -> {"cpu_s", "wall_s"}; ValueError (saying what is wrong) if malformed."""
    if not isinstance(compute, dict) or set(compute) != set(KEYS):
        keys = sorted(compute) if isinstance(compute, dict) else type(compute).__name__
        raise ValueError(f"compute {keys}; expected exactly {list(KEYS)}")
    out = {}
    for key in KEYS:
        seconds = finite_number(compute[key])
        if seconds is None or not 0 <= seconds <= MAX_SECONDS:
            raise ValueError(f"compute {key} {compute[key]!r:.40}; expected finite seconds in [0, {MAX_SECONDS:g}]")
        out[key] = seconds
    return out


def reported(meta: object) -> dict[str, float] | None:
    """A client's ``compute`` report from an answer's metadata, or None if absent or malformed."""
    if not isinstance(meta, dict) or "compute" not in meta:
        return None
    try:
        return parse(meta["compute"])
    except ValueError:
        return None
