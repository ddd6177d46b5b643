"""Which trust-region steps of the report's IFed-ICL cells the next round undid, and the accuracy on each side.

A round's stored server state keeps ``accepted``: the Λ its step started from. Where round k + 1's ``accepted`` is
not round k's published Λ, round k + 1 undid step k, and a run that ended after round k with a closing check would
have ended on that earlier Λ. Reads the report's run store (``federation_store``, kept by the machine that computed
the cells, not committed) and the committed cells.

    python docs/recipe-checks/closing-check/undone_steps.py docs/report/smollm2-135m/label-only \\
        docs/report/gemma3-270m/label-only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ifedicl.federation_job.tail_average import split_state
from ifedicl.storage.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="a report's model/objective folders")
    args = parser.parse_args()
    for report in args.reports:
        store = Store(str(report / "federation_store"))
        for path in sorted((report / "cells").glob("ifedicl__*.json")):
            cell = json.loads(path.read_text())
            published = {int(r): np.asarray(v) for r, v in cell["coefficients_by_round"].items()}
            accuracy = {r["round"]: r["accuracy"] for r in cell["per_round"]}
            states = store.server_states(cell["run_id"])
            for k in sorted(published):
                kept = split_state(states[k + 1])[0].get("accepted") if k + 1 in states else None
                if kept is None or np.allclose(kept, published[k], atol=1e-6):
                    continue
                back = [j for j in published if j < k and np.allclose(kept, published[j], atol=1e-6)]
                print(json.dumps({"report": str(report), "cell": path.name, "undone_round": k, "back_to": back,
                                  "accuracy": accuracy.get(k), "accuracy_back": [accuracy.get(j) for j in back]}))


if __name__ == "__main__":
    main()
