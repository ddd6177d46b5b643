"""The first round where another ridge's step differs from a run's, scored without running it: exact, not a
simulation.

Why exact: up to the first round whose step another ridge would change (the damping floor only matters when the
step would otherwise stop inside the radius, or at a boundary μ under the floor), that ridge's run has the same Λ,
windows, clients' statistics and trust-region state as the run computed. That round's stored state (the Λ its
step starts from, the pooled gradient and Gauss-Newton matrix with memory, the radius) gives the other ridge's
step exactly; its Λ is scored on the cell's test set with the run's vectors. Reads the cell, the run store its
command wrote (not committed) and the folder's results.json settings; a ridge the settings do not name is the
default of the code this runs from (run it from the cell's code version).

    python docs/recipe-checks/step-ridge/first_damped_round.py \\
        docs/recipe-checks/step-ridge/ridge-0.1/cells/ifedicl__subj__a0.5__s0.json --ridges 0,0.3,1,3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ifedicl.federation_job.options import FederationOptions
from ifedicl.federation_job.second_order import TrustRegionState, trust_region_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stored_run import StoredRun  # noqa: E402  (docs/recipe-checks/stored_run.py)


def first_change(
    states: dict[int, TrustRegionState], run_ridge: float, ridge: float
) -> tuple[int | None, np.ndarray | None]:
    """The first round whose step under ``ridge`` is not the run's (under ``run_ridge``), and that step [P]."""
    for k in sorted(states):
        state = states[k]
        step = trust_region_step(state.gradient, state.curvature, state.radius, ridge)
        if not np.allclose(step, trust_region_step(state.gradient, state.curvature, state.radius, run_ridge)):
            return k, step
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", type=Path, help="an IFed-ICL cell of an `ifedicl eval` folder")
    parser.add_argument("--ridges", default="0,0.3,1,3")
    args = parser.parse_args()
    run = StoredRun.open(args.cell)
    states, own, accuracy = run.states(), run.accuracy(), run.scorer()
    run_ridge = FederationOptions(**run.settings.federation).step_ridge  # named, or the default of the code run
    for ridge in (float(r) for r in args.ridges.split(",")):
        k, step = first_change(states, run_ridge, ridge)
        if k is None:
            print(json.dumps({"cell": args.cell.name, "ridge": ridge, "round": None}), flush=True)  # the same run
            continue
        state = states[k]
        coefficients = (state.accepted.reshape(-1) + step).reshape(state.accepted.shape)  # [L, 2, 2]
        print(json.dumps({"cell": args.cell.name, "round": k, "ridge": ridge, "radius": state.radius,
                          "step": round(float(np.linalg.norm(step)), 3), "run_step": round(state.last_step, 3),
                          "accuracy": accuracy(coefficients), "run_accuracy": own.get(k)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
