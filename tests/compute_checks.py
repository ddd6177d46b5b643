"""Checks on the client compute a run reports (shared by the IFed-ICL and FedAvg-LoRA tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray


def process_cpu_seconds(actor) -> float:
    """User + system CPU seconds of the actor's process so far, from /proc (fields 14 and 15)."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_compute_totals(summary: dict, stages: set[str], clients: set[int]) -> None:
    """Every reported number is positive and the run's totals are their sums, whichever way they are cut."""
    reports = [
        (stage, int(cid), seconds)
        for r in summary["rounds"]
        for stage, by_client in r["client_seconds"].items()
        for cid, seconds in by_client.items()
    ]
    assert {s for s, _, _ in reports} == stages and {c for _, c, _ in reports} == clients
    for _, _, seconds in reports:
        assert seconds["cpu_s"] > 0 and seconds["wall_s"] > 0
    for kind in ("cpu", "wall"):
        total = summary[f"client_{kind}_seconds"]
        assert total == pytest.approx(sum(r[f"{kind}_s"] for _, _, r in reports), abs=1e-3)
        assert total == pytest.approx(sum(v[kind] for v in summary["client_seconds_by_stage"].values()), abs=1e-3)
        assert total == pytest.approx(sum(v[kind] for v in summary["client_seconds_per_client"].values()), abs=1e-3)
