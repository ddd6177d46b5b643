"""The cells of a report or eval folder by method and task: what the recipe checks that compare folders share.

Scripts in the folders beside it import it with ``sys.path`` set to this folder (they are run as files).
"""

from __future__ import annotations

import json
from pathlib import Path


def cells(folder: Path, method: str, task: str) -> dict[int, dict]:
    """{seed: cell} of one method and task in a folder's cells/."""
    found = (json.loads(path.read_text()) for path in sorted((folder / "cells").glob(f"{method}__{task}__*.json")))
    return {cell["seed"]: cell for cell in found}
