"""Tail averaging of Λ (issue 30's candidate 3): a round publishes the mean of the last ``rounds`` rounds' Λ,
while the round rule keeps stepping from its own.

Why: a trust-region step is accepted on one window's evidence, and some accepted steps cost accuracy on the
held-out data (SmolLM2 × AG News, seed 2: 80.4 after round 2, 72.6 after round 3, docs/recipe.md). The mean
of the last iterates cancels such a step's noise at no client cost: nothing extra is asked of the clients, and
the rule's own trajectory (what the clients compute at, what the trust region measures) is unchanged. Which Λ
each round publishes is the only difference.

The iterates of the window are server state: stored with each round, so a resumed or recalibrated run
continues from the last iterate and keeps averaging over the same window.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ifedicl.federation_job.strategies import Aggregate, ClientUpdate, RoundId, RoundUpload, Strategy, WrappedStrategy
from ifedicl.kernel.errors import FederationError

ITERATES = "tail_iterates"  # the stored state's field: [≤rounds, L, 2, 2] the window's iterates, oldest first


def split_state(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A stored round state -> (the round rule's own fields, the tail's iterates or None)."""
    rule = {name: value for name, value in arrays.items() if name != ITERATES}
    return rule, arrays.get(ITERATES)


def checked_iterates(iterates: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Stored iterates as a window of Λ of ``shape`` -> [≤rounds, *shape] float32; FederationError if they are
    not one (another shape, empty, not finite)."""
    iterates = np.asarray(iterates, dtype=np.float32)
    if iterates.ndim != len(shape) + 1 or iterates.shape[1:] != tuple(shape) or len(iterates) == 0:
        raise FederationError(f"the stored tail iterates have shape {iterates.shape}, Λ has {tuple(shape)}")
    if not np.all(np.isfinite(iterates)):
        raise FederationError("the stored tail iterates are not finite")
    return iterates


class TailAverage(WrappedStrategy):
    """The inner rule's Λ is the iterate; the round's value is the mean of the last ``rounds`` iterates."""

    def __init__(self, inner: Strategy, rounds: int):
        if rounds < 2:
            raise FederationError(f"a tail average needs at least 2 rounds (got {rounds})")
        super().__init__(inner)
        self.rounds = rounds
        self.iterates: list[np.ndarray] = []  # [≤rounds] each [L, 2, 2], oldest first

    def round_upload(self, coefficients: np.ndarray) -> RoundUpload:
        """The inner rule's request, at the last iterate: ``coefficients`` (what the last round published)
        only until there is one."""
        start = self.iterates[-1] if self.iterates else coefficients
        return replace(self.inner.round_upload(start), start=start)

    def aggregate(self, at: RoundId, updates: list[ClientUpdate], reference: np.ndarray | None = None) -> Aggregate:
        result = self.inner.aggregate(at, updates, reference)
        self.iterates = [*self.iterates, result.value.astype(np.float32)][-self.rounds :]
        average = np.mean(np.stack(self.iterates), axis=0)  # [L, 2, 2]
        return replace(result, value=average.astype(np.float32))

    def state_arrays(self) -> dict[str, np.ndarray] | None:
        """The inner rule's fields and the window's iterates ({} before the first round: a state, but empty)."""
        rule = self.inner.state_arrays() or {}
        return {**rule, ITERATES: np.stack(self.iterates)} if self.iterates else rule

    def resume(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
        """The stored iterates (at most this run's window of them, the newest) and the inner rule's state.
        A state without iterates (a run that published its own Λ) resumes the rule alone: the window starts
        at the next round."""
        rule, iterates = split_state(arrays)
        if iterates is not None:
            iterates = checked_iterates(iterates, shape)
        if rule:
            self.inner.resume(rule, shape)
        self.iterates = [] if iterates is None else list(iterates[-self.rounds :])


def tail_average(rule: Strategy, rounds: int) -> Strategy:
    """``rule`` itself when each round publishes its own Λ (``rounds`` = 1), else behind a :class:`TailAverage`."""
    return rule if rounds == 1 else TailAverage(rule, rounds)


__all__ = ["ITERATES", "TailAverage", "checked_iterates", "split_state", "tail_average"]
