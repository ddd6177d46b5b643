"""What `--average-rounds K` publishes on the report's IFed-ICL cells, scored without running them again.

Why this is exact rather than a simulation: averaging does not change the round rule's trajectory (the clients
compute at the rule's own Λ; tests/test_tail_average.py runs both and compares), so a cell's Λ after each round
(``coefficients_by_round``) are the iterates an averaging run steps through, and the mean of the last K of them
is what it would publish. The context vectors come from the report's run store when it still holds the run,
else from the cell's stage 1 run again (``--rounds 0``, same seed and split: bit-identical on AG News seed 2,
the one run checked against its stored vectors). Scoring is the harness's ``score`` on the cell's test set.

    python docs/recipe-checks/tail-average/score_tail_average.py --rounds 3,4,5,12 --widths 2 \\
        docs/report/smollm2-135m/label-only/cells/ifedicl__subj__a0.5__s0.json ... > scores.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ifedicl.evaluation.context import MethodContext, federation_settings
from ifedicl.evaluation.scoring import score
from ifedicl.evaluation.settings import Cell, EvalSettings
from ifedicl.evaluation.tasks import prepare_task
from ifedicl.federation_job.driver import Federation
from ifedicl.kernel.modeling import canonical_model_id, load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.storage.store import Store, StoreError


def stage_one_vectors(mc: MethodContext, cell: dict, task, scratch: str) -> np.ndarray:
    """The cell's context vectors from its stage 1 run again: the harness's own federation, with no rounds."""
    at = Cell("ifedicl", cell["location"], cell["alpha"], cell["seed"])
    run = replace(federation_settings(mc, at), rounds=0)
    return Federation(mc.model_id, task.source, scratch, run).run(publish=False).vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cells", nargs="+", type=Path, help="IFed-ICL cell files of one report directory")
    parser.add_argument("--rounds", default="3,4,5,12", help="rounds whose published Λ to score")
    parser.add_argument("--widths", default="2", help="window sizes K")
    args = parser.parse_args()
    report = args.cells[0].parent.parent
    settings = EvalSettings(**json.loads((report / "results.json").read_text())["settings"])
    store = Store(str(report / "federation_store"))
    model_id = canonical_model_id(settings.model)
    model = load_model(model_id, settings.dtype)
    mc = MethodContext(settings, model_id, model, HFContextModel(model), load_tokenizer(model_id), report)
    scratch = tempfile.mkdtemp(prefix="tail-average-store-")
    for path in args.cells:
        cell = json.loads(path.read_text())
        task = prepare_task(cell["location"], settings.max_train, settings.test_size, settings.test_seed, {})
        try:
            vectors, source = store.load_run(cell["task"], cell["run_id"]).vectors, "run store"
        except StoreError:
            vectors, source = stage_one_vectors(mc, cell, task, scratch), "stage 1 again"
        by_round = {int(r): np.asarray(v, dtype=np.float32) for r, v in cell["coefficients_by_round"].items()}
        own = {p["round"]: p["accuracy"] for p in cell["per_round"]}
        for k in (int(r) for r in args.rounds.split(",")):
            for width in (int(w) for w in args.widths.split(",")):
                published = np.mean([by_round[j] for j in range(max(1, k - width + 1), k + 1)], axis=0)  # [L, 2, 2]
                batch = mc.settings.batch_size
                scored = score(mc.ctx, mc.tokenizer, task.spec, task.test, None, vectors, published, batch)
                print(json.dumps({"cell": path.name, "round": k, "width": width, "own": own.get(k),
                                  "averaged": scored["accuracy"], "vectors": source}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
