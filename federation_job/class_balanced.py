"""Class-balanced stage 1: pool each class over the clients, then average the classes.

Why: I2CL builds its context vector from demonstrations sampled evenly per class. The paper's
federated estimator averages each client's mean, and under label skew each client's mean is
mostly its majority class, so the global vector leans towards whichever classes the larger
skews favour. Here each client uploads its per-class means and counts; the server pools every
class over all clients (the class mean over every client's examples of it) and averages the
classes present, which is the centralized class-balanced mean exactly, whatever the split.

It costs C times the stage-1 upload (once per run) and reveals each client's per-class counts
to the server; the norm screen, robust aggregators, secure aggregation and DP on the vectors are
not defined for it (refused by the settings, and by a client asked for it under DP).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ifedicl.kernel.errors import FederationError

ESTIMATORS = ("mean", "class-balanced")  # --stage1: the paper's mean of client means, or class-balanced
MAX_ABS_VALUE = 1e6  # as every clear-text update (strategies.check_update)


def class_means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-class sums [C, L, 2, d] and counts [C] -> per-class means [C, L, 2, d] (zeros for an absent class)."""
    safe = np.maximum(counts, 1).astype(np.float64)[:, None, None, None]
    return (sums / safe).astype(np.float32)


def pooled_mean(uploads: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[(means [C, L, 2, d], counts [C]) per client] -> the mean over classes present of each class's pooled
    mean: sum_k n_kc * m_kc / sum_k n_kc, averaged over c with sum_k n_kc > 0. [L, 2, d] float32."""
    if not uploads:
        raise FederationError("class-balanced stage 1: no client uploaded its class means")
    total = sum(counts.astype(np.float64)[:, None, None, None] * means for means, counts in uploads)  # [C, L, 2, d]
    examples = sum(counts.astype(np.float64) for _, counts in uploads)  # [C]
    present = examples > 0
    return (total[present] / examples[present][:, None, None, None]).mean(axis=0).astype(np.float32)


def check_class_upload(means: np.ndarray, counts: np.ndarray, shape: tuple[int, ...], joined: int) -> None:
    """A client's class means [C, L, 2, d] and counts [C]: the right shapes, finite and bounded values, whole
    non-negative counts that add up to at most the examples it joined with. Anything else: FederationError."""
    classes = counts.shape[0] if counts.ndim == 1 else -1
    if counts.ndim != 1 or means.shape != (classes, *shape):
        raise FederationError(f"class means {means.shape} and counts {counts.shape} do not fit [C, {shape}]")
    if counts.dtype.kind not in "iu" or (counts < 0).any() or not 0 < int(counts.sum()) <= joined:
        raise FederationError(f"class counts {counts.tolist()} are not whole, non-negative and at most {joined}")
    if not np.isfinite(means).all() or np.abs(means).max() > MAX_ABS_VALUE:
        raise FederationError("class means are not finite values within +-1e6")
