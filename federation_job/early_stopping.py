"""Early stopping on the clients' own held-out loss (``--holdout-fraction``, ``--patience``).

Why: with a few hundred examples per task, Λ fits the clients' round windows past the point where it
generalises (SmolLM2 × SST-2 peaked after round 2 of 12 and Emotion after round 5, then drifted down),
and every round after the best one is client compute spent for nothing. The server sees no data, so the
signal has to come from the clients: each keeps a fixed fraction of its shard out of every round and,
with each round's upload, reports the loss of the round's starting Λ on it (one forward pass). The
server pools those losses by held-out counts; after ``patience`` rounds without a new best it stops,
and the run ends on the best Λ: the round that stops records that Λ as its own, so the store, serving
and the per-round history need nothing new. With ``--average-rounds`` a round starts from the rule's iterate,
not from the published mean, so the run ends on that iterate: the Λ whose held-out loss was measured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ifedicl.federation_job.strategies import ClientUpdate


def holdout_rows(num_examples: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A client's shard -> (rows the rounds train on, rows held out), the same split every round of a run.

    At least one row on each side (``--min-shard`` keeps shards at 2 or more).
    """
    if num_examples < 2:
        raise ValueError(f"a held-out split needs at least 2 examples (got {num_examples})")
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    held = min(num_examples - 1, max(1, round(fraction * num_examples)))
    return sorted(order[held:]), sorted(order[:held])


def pooled_holdout_loss(updates: list[ClientUpdate]) -> float | None:
    """The clients' held-out losses, weighted by their held-out counts; None if no update carried one."""
    reported = [u.holdout for u in updates if u.holdout is not None]
    if not reported:
        return None
    total = sum(count for count, _ in reported)
    return sum(count * loss for count, loss in reported) / total


@dataclass
class EarlyStopping:
    """``observe`` each round's pooled held-out loss of the Λ it started from; ``stop`` once ``patience``
    observations in a row brought no new best. ``best_round`` is the round whose Λ had the lowest loss."""

    patience: int
    losses: dict[int, float] = field(default_factory=dict)  # round whose Λ was scored -> pooled held-out loss
    best_round: int | None = None

    def observe(self, round_index: int, loss: float | None) -> None:
        if loss is None:  # no client reported one this round: nothing learnt, nothing counted
            return
        self.losses[round_index] = loss
        if self.best_round is None or loss < self.losses[self.best_round]:
            self.best_round = round_index

    @property
    def stop(self) -> bool:
        if self.best_round is None:
            return False
        return sum(1 for r in self.losses if r > self.best_round) >= self.patience

    def summary(self, stopped_at: int | None) -> dict:
        return {
            "holdout_loss_by_round": {str(r): loss for r, loss in sorted(self.losses.items())},
            "best_round": self.best_round,
            "stopped_at_round": stopped_at,
        }
