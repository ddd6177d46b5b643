"""The retry after a run's first undone step under `--no-remember-undone`, scored without running it: exact.

Why exact: up to the first round whose check undoes a step, a run with and without the undone window in the
memory is the same run (same Λ, windows, statistics and trust-region state). At that round the trust region goes
back to the Λ the step started from with a quarter of the radius; without the undone window, its retry steps on the
memory as it stood after the round before (that round's stored state: the decayed sums and the Λ re-centred on).
Its Λ is scored on the cell's test set with the run's vectors. Reads the cell, the run store that computed it (not
committed) and the folder's results.json settings.

    python docs/recipe-checks/remember-undone/first_retry.py \\
        docs/report/gemma3-270m/label-only/cells/ifedicl__agnews__a0.5__s2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ifedicl.federation_job.second_order import trust_region_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stored_run import StoredRun  # noqa: E402  (docs/recipe-checks/stored_run.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", type=Path, help="an IFed-ICL cell of a report or eval folder (model/objective/cells)")
    args = parser.parse_args()
    run = StoredRun.open(args.cell)
    states = run.states()
    undone = next(k for k in sorted(states) if states[k].measured and states[k].measured[1] < 0)  # ρ's bound < 0
    before = states[undone - 1]
    gradient, curvature = before.remembered(before.accepted)  # the memory without the undone step's window
    radius = states[undone].radius
    step = trust_region_step(gradient, curvature, radius)  # [P]
    coefficients = (before.accepted.reshape(-1) + step).reshape(before.accepted.shape)  # [L, 2, 2]
    print(json.dumps({"cell": args.cell.name, "undone_round": undone, "radius": radius,
                      "remembered_gradient_norm": {"without": float(np.linalg.norm(gradient)),
                                                   "with": float(np.linalg.norm(states[undone].gradient))},
                      "accuracy_without": run.scorer()(coefficients),
                      "accuracy_with": run.accuracy().get(undone)}))  # fmt: skip


if __name__ == "__main__":
    main()
