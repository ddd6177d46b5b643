"""Robust aggregation: reject outlying updates, then a coordinate-wise robust mean.

Why: one participant with a bug or a grudge must not move the global vectors or Λ
arbitrarily. FedAvg's mean has breakdown point 0 (one client can put it anywhere);
a coordinate-wise median has 1/2 and a β-trimmed mean β. A norm screen catches the
crude attacks (a scaled or sign-flipped update) before any mean sees them, and
the rejected client is recorded with its reason like a dropped one.

Screening needs each client's update in the clear, so it is off under secure
aggregation (the server only sees the sum there; see :mod:`ifedicl.federation_job.secagg`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ifedicl.federation_job.strategies import ClientUpdate, FedAvg, sample_clients
from ifedicl.kernel.errors import FederationError

AGGREGATORS = ("mean", "trimmed-mean", "median")


@dataclass(frozen=True)
class NormScreen:
    """Reject ``||u - reference|| > factor * median`` over the round's updates (factor 0: off).

    The reference is what an honest update is measured from: the round's global Λ for
    coefficients (a flipped Λ has the same norm as an honest one but a huge delta),
    zero for context vectors (a scaled vector has a large norm). Needs at least
    ``min_updates`` updates: with two, neither can be told from the other.
    """

    factor: float = 10.0
    min_updates: int = 3

    def __call__(
        self, updates: list[ClientUpdate], reference: np.ndarray | None = None
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        if self.factor <= 0 or len(updates) < self.min_updates:
            return updates, {}
        ref = np.zeros_like(updates[0].values, dtype=np.float64) if reference is None else reference.astype(np.float64)
        norms = np.array([np.linalg.norm(u.values.astype(np.float64) - ref) for u in updates])  # [K]
        median = float(np.median(norms))
        bound = self.factor * median
        kept, rejected = [], {}
        for update, norm in zip(updates, norms):
            if median > 0 and norm > bound:
                rejected[update.client_id] = (
                    f"rejected update: norm {norm:.4g} > {self.factor:g} x round median {median:.4g}"
                )
            else:
                kept.append(update)
        return kept, rejected


def trim_count(num_updates: int, trim_fraction: float) -> int:
    """How many values are cut from *each* end; always leaves at least one."""
    return min(int(np.floor(trim_fraction * num_updates)), (num_updates - 1) // 2)


def coordinate_trimmed_mean(stacked: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per coordinate: drop the ``trim`` smallest and largest of K values, mean the rest. [K, ...] -> [...]."""
    cut = trim_count(stacked.shape[0], trim_fraction)
    ordered = np.sort(stacked, axis=0)
    return ordered[cut : stacked.shape[0] - cut].mean(axis=0)


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    """Per coordinate median of K values. [K, ...] -> [...]."""
    return np.median(stacked, axis=0)


@dataclass(frozen=True)
class RobustStrategy:
    """Flower-style strategy: ``configure`` picks the round's clients, ``aggregate`` screens and combines."""

    aggregator: str = "mean"
    trim_fraction: float = 0.1
    screen: NormScreen = NormScreen()
    weighted: bool = False

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise FederationError(f"aggregator must be one of {AGGREGATORS} (got {self.aggregator!r})")
        if not 0 <= self.trim_fraction < 0.5:
            raise FederationError(f"trim fraction must be in [0, 0.5) (got {self.trim_fraction})")
        if self.weighted and self.aggregator != "mean":
            raise FederationError("weighted means only go with --aggregator mean (robust aggregators are unweighted)")

    def configure(self, available: list[int], fraction: float, min_clients: int, rng: np.random.Generator) -> list[int]:
        return sample_clients(available, fraction, min_clients, rng)

    def aggregate(
        self, updates: list[ClientUpdate], reference: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, list[ClientUpdate], dict[int, str]]:
        """(aggregate or None if nothing survived, the updates used, {client: reason} for rejected)."""
        kept, rejected = self.screen(updates, reference)
        if not kept:
            return None, kept, rejected
        if self.aggregator == "mean":
            return FedAvg(self.weighted).aggregate(kept), kept, rejected
        stacked = np.stack([u.values.astype(np.float64) for u in kept])  # [K, ...]
        if self.aggregator == "median":
            out = coordinate_median(stacked)
        else:
            out = coordinate_trimmed_mean(stacked, self.trim_fraction)
        return out.astype(np.float32), kept, rejected
