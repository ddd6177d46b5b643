"""The server role: client sampling and aggregation (Flower-style small objects).

Stage 1 averages context vectors once; stage 2 averages Λ every round (FedAvg).
The paper uses unweighted means; weighting by N_k is offered for skewed splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ifedicl.kernel.errors import FederationError


@dataclass
class ClientUpdate:
    """One client's upload, decoded: values plus how many examples produced them."""

    client_id: int
    values: np.ndarray  # [L, 2, d] vectors or [L, 2, 2] coefficients
    num_examples: int
    loss: float | None = None


def sample_clients(available: list[int], fraction: float, min_clients: int, rng: np.random.Generator) -> list[int]:
    """Clients asked to train this round: ``fraction`` of those alive, never fewer than ``min_clients``."""
    if not available:
        return []
    count = min(len(available), max(min_clients, int(round(fraction * len(available)))))
    return sorted(int(c) for c in rng.choice(available, size=count, replace=False))


def check_update(update: ClientUpdate, expected_shape: tuple[int, ...]) -> None:
    if update.values.shape != expected_shape:
        raise FederationError(f"client {update.client_id} sent shape {update.values.shape}, expected {expected_shape}")
    if not np.all(np.isfinite(update.values)):
        raise FederationError(f"client {update.client_id} sent non-finite values")
    if update.num_examples < 1:
        raise FederationError(f"client {update.client_id} reported {update.num_examples} examples")


class FedAvg:
    """Mean of client updates, optionally weighted by each client's example count."""

    def __init__(self, weighted: bool = False):
        self.weighted = weighted

    def aggregate(self, updates: list[ClientUpdate]) -> np.ndarray:
        if not updates:
            raise FederationError("nothing to aggregate: no client update")
        stacked = np.stack([u.values.astype(np.float64) for u in updates])  # [K, ...]
        if self.weighted:
            weights = np.asarray([u.num_examples for u in updates], dtype=np.float64)
        else:
            weights = np.ones(len(updates), dtype=np.float64)
        weights /= weights.sum()
        return np.tensordot(weights, stacked, axes=1).astype(np.float32)
