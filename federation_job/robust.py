"""Robust aggregation: reject outlying updates, then a coordinate-wise robust mean.

Why: one participant with a bug or a grudge must not move the global vectors or Λ
arbitrarily. FedAvg's mean has breakdown point 0 (one client can put it anywhere);
a coordinate-wise median has 1/2 and a β-trimmed mean β (:class:`CoordinateMedian`,
:class:`TrimmedMean`). A norm screen catches the crude attacks (a scaled or sign-flipped
update) before any mean sees them, and the rejected client is recorded with its reason
like a dropped one; it is a wrapper (:class:`Screened`) so it goes in front of any rule.

Screening needs each client's update in the clear, so it is off under secure
aggregation (the server only sees the sum there; see :mod:`ifedicl.federation_job.secagg`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ifedicl.federation_job.exchange import log_event
from ifedicl.federation_job.strategies import (
    Aggregate,
    ClearTextStrategy,
    ClientSelection,
    ClientUpdate,
    RoundId,
    Strategy,
)
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


class CoordinateMedian(ClearTextStrategy):
    """Per coordinate, the median of the K updates: breakdown point 1/2 (unweighted)."""

    def __init__(self, selection: ClientSelection = ClientSelection()):
        super().__init__(selection)

    def combine(self, updates: list[ClientUpdate]) -> np.ndarray:
        return coordinate_median(np.stack([u.values.astype(np.float64) for u in updates]))


class TrimmedMean(ClearTextStrategy):
    """Per coordinate, the mean after cutting ``trim_fraction`` of the K values from each end (unweighted)."""

    def __init__(self, trim_fraction: float = 0.1, selection: ClientSelection = ClientSelection()):
        if not 0 <= trim_fraction < 0.5:
            raise FederationError(f"trim fraction must be in [0, 0.5) (got {trim_fraction})")
        super().__init__(selection)
        self.trim_fraction = trim_fraction

    def combine(self, updates: list[ClientUpdate]) -> np.ndarray:
        return coordinate_trimmed_mean(np.stack([u.values.astype(np.float64) for u in updates]), self.trim_fraction)


class Screened(Strategy):
    """Any strategy behind a :class:`NormScreen`: outliers are rejected (and recorded) before the rule sees them."""

    def __init__(self, inner: Strategy, screen: NormScreen):
        if inner.masked:
            raise FederationError("a norm screen needs each update in the clear, not masked")
        super().__init__(inner.selection, inner.weighted)
        self.inner = inner
        self.screen = screen

    def aggregate(self, at: RoundId, updates: list[ClientUpdate], reference: np.ndarray | None = None) -> Aggregate:
        self.selection.require(len(updates), at.name)
        kept, rejected = self.screen(updates, reference)
        for cid, reason in rejected.items():
            log_event("client_rejected", stage=at.stage, round=at.index, client=cid, reason=reason)
        self.selection.require(len(kept), f"{at.stage} round {at.index} after screening" if rejected else at.stage)
        inner = self.inner.aggregate(at, kept, reference)
        return Aggregate(inner.value, inner.used, {**rejected, **inner.dropped}, inner.traffic)
