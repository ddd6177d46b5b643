"""What the recipe checks that compare folders share: a folder's cells by method and task, and the mean ± standard
error over seeds their summaries print.

Scripts in the folders beside it import it with ``sys.path`` set to this folder (they are run as files).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def cells(folder: Path, method: str, task: str) -> dict[int, dict]:
    """{seed: cell} of one method and task in a folder's cells/."""
    found = (json.loads(path.read_text()) for path in sorted((folder / "cells").glob(f"{method}__{task}__*.json")))
    return {cell["seed"]: cell for cell in found}


def mean_and_error(values: list[float]) -> str:
    """``mean ± standard error`` of per-seed values (error 0 for one)."""
    error = np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{np.mean(values):+.2f} ± {error:.2f}"
