"""Per round of an IFed-ICL cell: accuracy, the trust region's radius and step, and where the step went in the
pooled Gauss-Newton matrix's spectrum.

Why: `--step-ridge r` damps every direction whose eigenvalue is under μ = r·tr(G)/P. Whether a value of r touches
the steps that cost accuracy is read here: for each round, G's mean and largest eigenvalue, how many of its P
eigenvalues lie under μ, and the share of the step's squared length along them, for the step the run took and for
the plain step (r = 0) from the same g, G and radius. Reads the cell and the run store its command wrote beside
it (``federation_store``, not committed: stored_run.StoredRun).

    python docs/recipe-checks/step-ridge/spectrum.py \\
        docs/recipe-checks/step-ridge/ridge-0.1/cells/ifedicl__subj__a0.5__s0.json --ridge 0.1
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


def flat_share(step: np.ndarray, basis: np.ndarray, flat: np.ndarray) -> float:
    """Of the step's squared length, the share along the eigenvectors marked ``flat``."""
    along = basis.T @ step  # [P]
    return float((along[flat] ** 2).sum() / max((along**2).sum(), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", type=Path)
    parser.add_argument("--ridge", type=float, required=True, help="r: μ = r·tr(G)/P marks the flat directions")
    args = parser.parse_args()
    run = StoredRun.open(args.cell)
    accuracy = {k: 100 * value for k, value in run.accuracy().items()}
    states = run.states()
    for k in sorted(states):
        state = states[k]
        eigenvalues, basis = np.linalg.eigh(state.curvature)
        eigenvalues = np.clip(eigenvalues, 0.0, None)  # [P]
        mu = args.ridge * float(eigenvalues.mean())
        flat = eigenvalues < mu
        plain = trust_region_step(state.gradient, state.curvature, state.radius)
        damped = trust_region_step(state.gradient, state.curvature, state.radius, args.ridge)
        print(json.dumps({
            "round": k,
            "accuracy": accuracy.get(k),
            "radius": state.radius,
            "step": round(state.last_step, 3),
            "mean_eigenvalue": float(eigenvalues.mean()),
            "max_eigenvalue": float(eigenvalues.max()),
            "flat_directions": int(flat.sum()),
            "plain_step": round(float(np.linalg.norm(plain)), 3),
            "plain_flat_share": round(flat_share(plain, basis, flat), 3),
            "ridge_step": round(float(np.linalg.norm(damped)), 3),
            "ridge_flat_share": round(flat_share(damped, basis, flat), 3),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
