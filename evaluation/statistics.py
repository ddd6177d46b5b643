"""Accuracy, macro-F1 and the mean ± std summaries reported in every table."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels))) if len(labels) else float("nan")


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all classes (a class never predicted nor present scores 0).

    Reported next to accuracy because a random or collapsed model that always says
    one class gets 1/C accuracy on a balanced test set but a much lower macro-F1.
    """
    pred, gold = np.asarray(predictions), np.asarray(labels)
    scores = []
    for c in range(num_classes):
        tp = float(np.sum((pred == c) & (gold == c)))
        fp = float(np.sum((pred == c) & (gold != c)))
        fn = float(np.sum((pred != c) & (gold == c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (0 for a single value); NaN for none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals))
