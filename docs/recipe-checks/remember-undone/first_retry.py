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
from pathlib import Path

import numpy as np

from ifedicl.evaluation.context import MethodContext
from ifedicl.evaluation.scoring import score
from ifedicl.evaluation.settings import EvalSettings
from ifedicl.evaluation.tasks import prepare_task
from ifedicl.federation_job.second_order import TrustRegionState, trust_region_step
from ifedicl.federation_job.tail_average import split_state
from ifedicl.kernel.modeling import canonical_model_id, load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.storage.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", type=Path, help="an IFed-ICL cell of a report or eval folder (model/objective/cells)")
    args = parser.parse_args()
    folder = args.cell.parent.parent
    settings = EvalSettings(**json.loads((folder / "results.json").read_text())["settings"])
    cell = json.loads(args.cell.read_text())
    store = Store(str(folder / "federation_store"))
    raw = {k: split_state(arrays)[0] for k, arrays in store.server_states(cell["run_id"]).items()}
    states = {k: TrustRegionState.from_arrays(arrays, arrays["accepted"].shape) for k, arrays in raw.items()}
    undone = next(k for k in sorted(states) if states[k].measured and states[k].measured[1] < 0)  # ρ's bound < 0
    before = states[undone - 1]
    gradient, curvature = before.remembered(before.accepted)
    radius = states[undone].radius
    step = trust_region_step(gradient, curvature, radius)  # [P]
    coefficients = (before.accepted.reshape(-1) + step).reshape(before.accepted.shape).astype(np.float32)
    model_id = canonical_model_id(settings.model)
    model = load_model(model_id, settings.dtype)
    mc = MethodContext(settings, model_id, model, HFContextModel(model), load_tokenizer(model_id), folder)
    task = prepare_task(cell["location"], settings.max_train, settings.test_size, settings.test_seed, {})
    vectors = store.load_run(cell["task"], cell["run_id"]).vectors
    scored = score(mc.ctx, mc.tokenizer, task.spec, task.test, None, vectors, coefficients, settings.batch_size)
    own = {p["round"]: p["accuracy"] for p in cell["per_round"]}
    print(json.dumps({"cell": args.cell.name, "undone_round": undone, "radius": radius,
                      "remembered_gradient_norm": {"without": float(np.linalg.norm(gradient)),
                                                   "with": float(np.linalg.norm(states[undone].gradient))},
                      "accuracy_without": scored["accuracy"], "accuracy_with": own.get(undone)}))  # fmt: skip


if __name__ == "__main__":
    main()
