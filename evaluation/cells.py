"""Finished cells on disk: ``<out>/cells/<key>.json``. This is what makes a run resumable.

A cell is written atomically (a temp file in the same directory, flushed to disk, then
renamed over the final name) only when it has finished, so an interrupted run leaves no
half cell: a reader sees the whole previous file or the whole new one. A file that does
not parse, lacks the fields every finished cell has, or was computed under different
settings (its ``settings_hash``, :meth:`EvalSettings.cell_hash` for its method, differs) does not
count as finished and is recomputed.
Each cell records the code version it was computed with and what it cost.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import stat
import tempfile
from pathlib import Path

from ifedicl.evaluation.settings import Cell, EvalSettings

REQUIRED = ("method", "settings_hash", "accuracy", "macro_f1", "cost")


class CellStore:
    def __init__(self, out_dir: Path, settings: EvalSettings, code_version: str | None = None):
        self.dir = Path(out_dir) / "cells"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.code_version = code_version

    def path(self, cell: Cell) -> Path:
        return self.dir / f"{cell.key}.json"

    def get(self, cell: Cell) -> dict | None:
        """The stored result, or None if absent, unreadable, incomplete, or from other settings."""
        path = self.path(cell)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        if not isinstance(record, dict) or any(k not in record for k in REQUIRED):
            return None
        return record if record.get("settings_hash") == self.hash(cell) else None

    def hash(self, cell: Cell) -> str:
        """The settings hash ``cell``'s record must carry: its method's, on its task's classes."""
        return self.settings.cell_hash(cell.method, task_classes(cell.task))

    def put(self, cell: Cell, task_name: str, result: dict) -> dict:
        record = {
            "method": cell.method,
            "task": task_name,
            "location": cell.task,
            "alpha": cell.alpha,
            "seed": cell.seed,
            "settings_hash": self.hash(cell),
            "code_version": self.code_version,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **result,
        }
        return self.replace(cell, record)

    def replace(self, cell: Cell, record: dict) -> dict:
        """Writes a finished cell's whole record (a new one, or one with rounds scored later)."""
        write_atomic(self.path(cell), json.dumps(record, indent=1, default=float))
        return record


@functools.cache
def task_classes(location: str) -> int | None:
    """How many labels the task at ``location`` has (its ``task.json``), or None where there is none to read (a hub
    dataset): a cell's hash names what ``--curvature auto`` computed on it."""
    from ifedicl.kernel.data import read_task_json

    spec = read_task_json(location) if Path(location).is_dir() else None
    return None if spec is None else len(spec.labels)


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or all of ``text``, never a part (same-directory rename). The file
    keeps its permissions, or gets the umask's for a new file (``mkstemp`` would leave it readable by its owner
    only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
