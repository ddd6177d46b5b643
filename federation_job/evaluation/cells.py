"""Finished cells on disk: ``<out>/cells/<key>.json``. This is what makes a run resumable.

A cell is written atomically (temp file + rename) only when it has finished, so an
interrupted run leaves no half cell. A cell computed under different settings (its
``settings_hash`` differs) does not count as finished and is recomputed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from federation_job.evaluation.settings import Cell


class CellStore:
    def __init__(self, out_dir: Path, settings_hash: str):
        self.dir = Path(out_dir) / "cells"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings_hash = settings_hash

    def path(self, cell: Cell) -> Path:
        return self.dir / f"{cell.key}.json"

    def get(self, cell: Cell) -> dict | None:
        """The stored result, or None if absent, unreadable, or from other settings."""
        path = self.path(cell)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return record if record.get("settings_hash") == self.settings_hash else None

    def put(self, cell: Cell, task_name: str, result: dict) -> dict:
        record = {
            "method": cell.method,
            "task": task_name,
            "location": cell.task,
            "alpha": cell.alpha,
            "seed": cell.seed,
            "settings_hash": self.settings_hash,
            **result,
        }
        path = self.path(cell)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=float))
        os.replace(tmp, path)
        return record
