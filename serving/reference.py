"""Reference classification on the Hugging Face path, from stored runs.

This is the ground truth the vLLM serving path is tested against: same prompt
(``task.prompt(text)``), same tokenizer call, same injection function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ifedicl.kernel.errors import DataError
from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_model, load_tokenizer
from ifedicl.kernel.task import TaskSpec, label_token_ids
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import predict_proba
from ifedicl.model_patches.injection import InjectionTables
from ifedicl.storage.store import Store, StoredRun


@dataclass
class Prediction:
    text: str
    label: str
    probabilities: dict[str, float]  # softmax over the label words' first tokens


class ReferenceClassifier:
    """Loads a model once and classifies texts under any stored run of the store."""

    def __init__(self, model_id: str, dtype: str = "float32"):
        self.model_id = canonical_model_id(model_id)
        self.tokenizer = load_tokenizer(model_id)
        self.ctx = HFContextModel(load_model(model_id, dtype))
        self.fingerprint = fingerprint(self.model_id, self.ctx.model.config)

    def load(self, store: Store, task: str, run_id: str | None = None) -> StoredRun:
        return store.load_run(task, run_id, expect=self.fingerprint)

    def classify(
        self, task: TaskSpec, texts: Sequence[str], run: StoredRun | None = None, batch_size: int = 16
    ) -> list[Prediction]:
        """Score ``task``'s label words for each text, injecting ``run`` (``None`` = the plain model)."""
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise DataError("empty text cannot be classified")
        tables, task_rows = None, None
        if run is not None:
            tables = InjectionTables.build([torch.from_numpy(run.vectors)], [torch.from_numpy(run.coefficients)])
            task_rows = [1] * len(texts)  # row 1 of the one-task tables
        label_ids = label_token_ids(task, self.tokenizer)
        prompts = [task.prompt(text) for text in texts]
        probs = predict_proba(self.ctx, self.tokenizer, prompts, label_ids, tables, task_rows, batch_size)
        return [_prediction(text, task.labels, p) for text, p in zip(texts, probs)]


def _prediction(text: str, labels: Sequence[str], probs: np.ndarray) -> Prediction:
    return Prediction(text, labels[int(np.argmax(probs))], {w: float(p) for w, p in zip(labels, probs)})
