"""Runs left ``running`` by a dead driver: detect them and mark them failed.

Why: a driver killed by SIGKILL, OOM or a lost node cannot run its own ``fail_run``;
its run row would say ``running`` forever. Each run records who drives it (host,
boot id, pid and the pid's start time, so a reused pid is not mistaken for it).
The next driver on any host reaps such runs: on the same host (same boot) a missing
process is proof; elsewhere the last write (run start or last round) older than the
run's own staleness bound is taken as a lost heartbeat. Their rows stay unloadable
either way (only ``complete`` runs load); reaping makes the status say so.

Reaping is a compare-and-set (:meth:`Store.fail_run` moves only a ``running`` run): a run its
driver finished meanwhile stays complete, and is not reported as reaped. A run row this reaper
cannot read (corrupt settings) is logged and left alone, never a reason to refuse a new run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from ifedicl.storage.store import Store

log = logging.getLogger("ifedicl.federation")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def driver_identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "pid_start": _pid_start(pid)}


def driver_alive(identity: dict) -> bool | None:
    """True/False when this machine can tell (same host and boot), None otherwise."""
    if not identity or identity.get("host") != socket.gethostname() or identity.get("boot_id") != _boot_id():
        return None
    pid = int(identity.get("pid", -1))
    if pid == os.getpid():
        return True
    start = _pid_start(pid)
    if not start:
        return False
    return start == identity.get("pid_start")


def stale_after_s(settings: dict, rounds_written: int = 1) -> float:
    """How long a live run can go without writing: a few round timeouts between two rounds (stage 1:
    extract, secure aggregation's two requests, broadcast), plus, before its first round is written,
    the time its clients may take to load beyond one round timeout (``load_timeout_s``: a big model on
    a slow node may load for longer than a round lasts)."""
    round_s = float(settings.get("round_timeout_s") or 1800.0)
    bound = 4.0 * round_s + 60.0
    if rounds_written == 0:
        bound += max(0.0, float(settings.get("load_timeout_s") or round_s) - round_s)
    return bound


def reap_dead_runs(store: Store, now: datetime | None = None) -> dict[str, str]:
    """Mark failed every ``running`` run whose driver is gone. Returns {run_id: reason} of the runs this call failed."""
    now = now or datetime.now(UTC)
    reaped: dict[str, str] = {}
    for row in store.runs():
        if row["status"] != "running":
            continue
        try:
            settings = json.loads(row["settings"] or "{}")
            identity = settings.get("driver", {}) if isinstance(settings, dict) else {}
            alive = driver_alive(identity)
            if alive is False:
                reason = f"driver died (pid {identity.get('pid')} on {identity.get('host')} is gone); run abandoned"
            elif alive is None:
                rounds = store.rounds(row["run_id"])
                last = max([row["created_at"], *(r["at"] for r in rounds)])
                idle = (now - last).total_seconds()
                if idle <= stale_after_s(settings, len(rounds)):
                    continue
                reason = f"no heartbeat for {idle:.0f}s (driver {identity or 'unknown'}); run abandoned"
            else:
                continue
        except (ValueError, TypeError, AttributeError) as err:  # a corrupt row: not this reaper's to judge
            log.error("run %s: its row cannot be read (%s: %s); not reaped", row["run_id"], type(err).__name__, err)
            continue
        if store.fail_run(row["run_id"], reason):  # False: its driver finished it meanwhile
            reaped[row["run_id"]] = reason
    return reaped


def ensure_writable(uri: str) -> None:
    """Fail before any work if a local store directory cannot be written (read-only mount, permissions)."""
    from ifedicl.kernel.errors import IfediclError

    if "://" in uri:
        return
    path = Path(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise IfediclError(
            f"store {uri} is not writable ({err.strerror or err}); nothing was run or published"
        ) from None
