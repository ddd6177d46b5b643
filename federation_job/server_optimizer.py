"""Λ's server optimizer: each round's aggregate, taken as a pseudo-gradient step (FedOpt, Reddi et al. 2021).

Why: a client's few local AdamW steps per round move Λ a short way, and FedAvg's mean of those
moves is the consensus direction but not its length: in the committed report the federated Λ
travelled about a third as far as centralized I2CL's, in nearly the same direction. The server
can go further along that direction at no client cost:

- ``sgd``: Λ ← Λ + lr·Δ, Δ = aggregate − Λ (FedAvgM's server learning rate without momentum;
  lr = 1 is plain FedAvg). Nothing carries over between rounds.
- ``momentum``: m ← μ·m + Δ; Λ ← Λ + lr·m (FedAvgM). Consistent directions add up over rounds.
- ``adam``: m ← β1·m + (1−β1)·Δ, v ← β2·v + (1−β2)·Δ², Λ ← Λ + lr·m/(√v + τ) (FedAdam): every
  coefficient moves about ``lr`` per round whatever the scale of its updates (λ ~ 0.1, β ~ 1).

The learning rate warms up linearly over ``warmup_rounds`` and then stays or decays (cosine) to
``min_lr_fraction``·lr at the last round. ``momentum`` and ``adam`` keep state (the step count and the
moments, each shaped like Λ); the driver stores it with every round, so a recalibration that warm-starts
from a live run continues its optimizer instead of restarting the moments at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ifedicl.federation_job.strategies import (
    Aggregate,
    ClientUpdate,
    RoundId,
    Strategy,
    WrappedStrategy,
)
from ifedicl.kernel.errors import FederationError

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
DECAYS = ("constant", "cosine")


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """What the server does with each round's aggregate (the defaults: FedAvg, the paper's)."""

    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9  # μ of momentum, β1 of adam
    beta2: float = 0.99  # adam
    tau: float = 1e-3  # adam's adaptivity floor: a coefficient whose updates are far below τ barely moves
    warmup_rounds: int = 0
    decay: str = "constant"
    min_lr_fraction: float = 0.1  # cosine decays to this fraction of lr at the last round
    rounds_total: int = 1  # the run's rounds, for the cosine

    def validate(self) -> None:
        checks = [
            (
                self.kind in SERVER_OPTIMIZERS,
                f"--server-optimizer must be one of {SERVER_OPTIMIZERS} (got {self.kind!r})",
            ),
            (self.lr > 0 and math.isfinite(self.lr), f"--server-lr must be > 0 (got {self.lr})"),
            (0 <= self.momentum < 1, f"--server-momentum must be in [0, 1) (got {self.momentum})"),
            (0 <= self.beta2 < 1, f"the adam β2 must be in [0, 1) (got {self.beta2})"),
            (self.tau > 0, f"the adam τ must be > 0 (got {self.tau})"),
            (self.warmup_rounds >= 0, f"--server-warmup must be >= 0 rounds (got {self.warmup_rounds})"),
            (self.decay in DECAYS, f"--server-decay must be one of {DECAYS} (got {self.decay!r})"),
            (0 <= self.min_lr_fraction <= 1, "the server's minimum lr fraction must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise FederationError(message)

    @property
    def stateless(self) -> bool:
        """True when a round depends on nothing but the round's start (``sgd``, no schedule)."""
        return self.kind == "sgd" and self.warmup_rounds == 0 and self.decay == "constant"

    def lr_at(self, round_index: int) -> float:
        """The server learning rate of round ``round_index`` (1-based): warm-up, then constant or cosine."""
        if round_index <= self.warmup_rounds:
            return self.lr * round_index / (self.warmup_rounds + 1)
        if self.decay == "constant":
            return self.lr
        span = max(1, self.rounds_total - self.warmup_rounds)
        progress = min(1.0, (round_index - self.warmup_rounds - 1) / max(1, span - 1))
        floor = self.min_lr_fraction
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class ServerOptimizerState:
    """What carries over between rounds: how many steps were taken and the moments, each shaped like Λ."""

    steps: int = 0
    first_moment: np.ndarray | None = None  # momentum / adam m, [L, 2, 2] float64
    second_moment: np.ndarray | None = None  # adam v, [L, 2, 2] float64

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"steps": np.asarray([self.steps], dtype=np.float64)}
        if self.first_moment is not None:
            arrays["first_moment"] = self.first_moment
        if self.second_moment is not None:
            arrays["second_moment"] = self.second_moment
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> ServerOptimizerState:
        """Checked: a state for another model's shape, or with non-finite or negative entries, is refused."""
        known = {"steps", "first_moment", "second_moment"}
        if set(arrays) - known or "steps" not in arrays:
            raise FederationError(f"server optimizer state has fields {sorted(arrays)}, expected {sorted(known)}")
        steps = np.asarray(arrays["steps"], dtype=np.float64).reshape(-1)
        if steps.shape != (1,) or not np.isfinite(steps[0]) or steps[0] < 0 or not float(steps[0]).is_integer():
            raise FederationError(f"server optimizer state has step count {steps.tolist()}, expected one integer >= 0")
        moments = {}
        for name in ("first_moment", "second_moment"):
            if name not in arrays:
                moments[name] = None
                continue
            value = np.asarray(arrays[name], dtype=np.float64)
            if value.shape != shape:
                raise FederationError(f"server optimizer state's {name} has shape {value.shape}, Λ has {shape}")
            if not np.all(np.isfinite(value)) or (name == "second_moment" and np.any(value < 0)):
                raise FederationError(f"server optimizer state's {name} is not finite (or a negative second moment)")
            moments[name] = value
        return cls(int(steps[0]), moments["first_moment"], moments["second_moment"])


class ServerOptimizer(WrappedStrategy):
    """Any rule's round value as a pseudo-gradient: Λ ← Λ + step(aggregate − Λ), per :class:`ServerOptimizerSettings`.

    Clients, uploads and the rule itself are the inner strategy's; only the step is this object's.
    """

    def __init__(self, inner: Strategy, settings: ServerOptimizerSettings):
        super().__init__(inner)
        settings.validate()
        self.settings = settings
        self.state = ServerOptimizerState()

    def state_arrays(self) -> dict[str, np.ndarray] | None:
        return None if self.settings.stateless else self.state.to_arrays()

    def resume(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
        """Continue from a stored state (a warm-started recalibration continues its live run's optimizer)."""
        self.state = ServerOptimizerState.from_arrays(arrays, shape)

    def aggregate(self, at: RoundId, updates: list[ClientUpdate], reference: np.ndarray | None = None) -> Aggregate:
        if reference is None:
            raise FederationError("a server step needs the round's starting value")
        result = self.inner.aggregate(at, updates, reference)
        start = reference.astype(np.float64)  # [L, 2, 2]
        delta = result.value.astype(np.float64) - start  # [L, 2, 2] the round's pseudo-gradient (a descent step)
        step, self.state = self._step(delta, at.index)
        return replace(result, value=(start + step).astype(np.float32))

    def _step(self, delta: np.ndarray, round_index: int) -> tuple[np.ndarray, ServerOptimizerState]:
        s, state = self.settings, self.state
        lr = s.lr_at(round_index)
        steps = state.steps + 1
        if s.kind == "sgd":
            return lr * delta, ServerOptimizerState(steps)
        previous = state.first_moment if state.first_moment is not None else np.zeros_like(delta)
        if s.kind == "momentum":
            moment = s.momentum * previous + delta
            return lr * moment, ServerOptimizerState(steps, moment)
        moment = s.momentum * previous + (1 - s.momentum) * delta
        second = state.second_moment if state.second_moment is not None else np.zeros_like(delta)
        second = s.beta2 * second + (1 - s.beta2) * delta**2
        # bias-corrected like Adam, so the first rounds are not damped by the zero start of the moments
        corrected = moment / (1 - s.momentum**steps), second / (1 - s.beta2**steps)
        return lr * corrected[0] / (np.sqrt(corrected[1]) + s.tau), ServerOptimizerState(steps, moment, second)


def server_optimizer(rule: Strategy, settings: ServerOptimizerSettings) -> Strategy:
    """``rule`` itself when the server step is plain FedAvg (sgd at lr 1, no schedule), else behind a
    :class:`ServerOptimizer`. Each round's rule only (Λ, and FedAvg-LoRA's adapters, which share it)."""
    if settings.stateless and settings.lr == 1:
        return rule
    return ServerOptimizer(rule, settings)


__all__ = [
    "DECAYS",
    "SERVER_OPTIMIZERS",
    "ServerOptimizer",
    "ServerOptimizerSettings",
    "ServerOptimizerState",
    "server_optimizer",
]
