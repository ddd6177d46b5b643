"""What the recipe checks that score a Λ offline share: an IFed-ICL cell, its folder's settings, the trust-region
states its run stored, and the harness's scoring on the cell's test set with the run's own vectors.

Why a module: a counterfactual round is only exact if it is scored the way the cell was (same model, dtype, test
sample, vectors and batch size); one place builds that. Scripts in the folders beside it import it with
``sys.path`` set to this folder (they are run as files, not as a package).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ifedicl.evaluation.scoring import score
from ifedicl.evaluation.settings import EvalSettings
from ifedicl.evaluation.tasks import prepare_task
from ifedicl.federation_job.second_order import TrustRegionState
from ifedicl.federation_job.tail_average import split_state
from ifedicl.kernel.modeling import canonical_model_id, load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.storage.store import Store


@dataclass
class StoredRun:
    """An IFed-ICL cell of a report or eval folder (``<folder>/cells/<cell>.json``) and the run store beside it."""

    path: Path
    cell: dict
    settings: EvalSettings
    store: Store

    @classmethod
    def open(cls, path: Path) -> StoredRun:
        folder = path.parent.parent
        settings = EvalSettings(**json.loads((folder / "results.json").read_text())["settings"])
        return cls(path, json.loads(path.read_text()), settings, Store(str(folder / "federation_store")))

    def states(self) -> dict[int, TrustRegionState]:
        """{round: the trust region's state after that round's step}, less a tail average's iterates."""
        rules = {k: split_state(arrays)[0] for k, arrays in self.store.server_states(self.cell["run_id"]).items()}
        return {k: TrustRegionState.from_arrays(arrays, arrays["accepted"].shape) for k, arrays in rules.items()}

    def accuracy(self) -> dict[int, float]:
        """{round: the cell's own accuracy} for the rounds it scored."""
        return {p["round"]: p["accuracy"] for p in self.cell["per_round"]}

    def scorer(self):
        """accuracy(Λ [L, 2, 2]) on the cell's test set with the run's vectors: loads the model once."""
        s = self.settings
        model_id = canonical_model_id(s.model)
        ctx, tokenizer = HFContextModel(load_model(model_id, s.dtype)), load_tokenizer(model_id)
        task = prepare_task(self.cell["location"], s.max_train, s.test_size, s.test_seed, {})
        vectors = self.store.load_run(self.cell["task"], self.cell["run_id"]).vectors

        def accuracy(coefficients: np.ndarray) -> float:
            coefficients = coefficients.astype(np.float32)
            return score(ctx, tokenizer, task.spec, task.test, None, vectors, coefficients, s.batch_size)["accuracy"]

        return accuracy
