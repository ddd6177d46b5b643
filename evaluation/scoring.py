"""Model → predictions → metrics, for plain prompts, demonstration prompts, or injection."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ifedicl.evaluation import statistics
from ifedicl.kernel.data import Split
from ifedicl.kernel.task import TaskSpec, label_token_ids
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import predict_proba
from ifedicl.model_patches.injection import InjectionTables


def score(
    ctx: HFContextModel,
    tokenizer,
    task: TaskSpec,
    test: Split,
    prompts: Sequence[str] | None = None,
    vectors: np.ndarray | None = None,
    coefficients: np.ndarray | None = None,
    batch_size: int = 16,
    with_predictions: bool = False,
) -> dict:
    """Accuracy and macro-F1 of argmax over the label words' first-token logits.

    ``prompts`` defaults to the zero-shot ``template(x)``; with ``vectors`` and
    ``coefficients`` the context vectors are injected (IFed-ICL / I2CL inference).
    ``with_predictions`` adds the predicted class of every test example (to pool predictions across clients).
    """
    prompts = list(prompts) if prompts is not None else [task.prompt(t) for t in test.texts]
    tables, index = None, None
    if vectors is not None:
        tables = InjectionTables.build([torch.from_numpy(vectors)], [torch.from_numpy(np.asarray(coefficients))])
        index = [1] * len(prompts)
    probs = predict_proba(ctx, tokenizer, prompts, label_token_ids(task, tokenizer), tables, index, batch_size)
    return _metrics(probs, test, task, with_predictions)


def score_shared_prefix(
    ctx: HFContextModel,
    tokenizer,
    task: TaskSpec,
    test: Split,
    prefixes: Sequence[str],
    queries: Sequence[str],
    batch_size: int = 16,
    with_predictions: bool = False,
) -> dict:
    """:func:`score` for prompts ``prefixes[i] + queries[i]`` whose prefixes (the demonstrations) repeat:
    each distinct prefix is run once (:mod:`.prefix`). Adds ``prefix_cache`` counts to the metrics."""
    from ifedicl.evaluation.prefix import predict_proba_shared_prefix

    stats: dict = {}
    probs = predict_proba_shared_prefix(
        ctx, tokenizer, prefixes, queries, label_token_ids(task, tokenizer), batch_size, stats
    )
    return {**_metrics(probs, test, task, with_predictions), "prefix_cache": stats}


def _metrics(probs: np.ndarray, test: Split, task: TaskSpec, with_predictions: bool = False) -> dict:
    predictions = probs.argmax(axis=1)
    return {
        "accuracy": statistics.accuracy(predictions, test.labels),
        "macro_f1": statistics.macro_f1(predictions, test.labels, len(task.labels)),
        **({"predictions": [int(p) for p in predictions]} if with_predictions else {}),
    }


def max_positions(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
