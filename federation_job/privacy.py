"""Differential privacy for what clients upload: clipped, Gaussian-noised vectors and Λ.

Why: a context vector is a mean of a client's activations, the most revealing upload;
with few examples it can leak them. Each client clips and noises *before* upload
(local noise), so the guarantee holds against the server too, not only against
readers of the published result.

Mechanisms (both add N(0, (z * sensitivity)^2) per coordinate):
- vectors (once): each example's [L, 2, d] contribution is clipped to L2 norm ``C_v``
  before the client's mean; replacing one example moves the mean by at most
  ``2 C_v / N_k``, the sensitivity. Unit: one example.
- Λ (every round): the update delta ``Λ_k - Λ_g`` is clipped to ``C_Λ``; replacing the
  client's whole data moves it by at most ``2 C_Λ``. Unit: the client's whole data
  (so it also covers one example).
A Gaussian of sensitivity Δ and std zΔ has the privacy curve of a sensitivity-1
Gaussian of std z, so the noise multiplier z is calibrated on ``GaussianDpEvent(z)``
and the accounting (calibration, composition over rounds, the run's total ε) is
done by Google's ``dp_accounting`` PLD accountant, not by hand. Λ rounds compose
without sampling amplification: the server picks the cohort, so no amplification is
claimed from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib.metadata import version

import numpy as np

from ifedicl.kernel.errors import IfediclError

# dp_accounting (and scipy under it) is imported lazily: clients import this module on their hot path.


def accountant_name() -> str:
    return f"dp_accounting {version('dp-accounting')} PLD accountant (privacy loss distributions)"


def _accountant():
    from dp_accounting.pld import pld_privacy_accountant

    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)


def _event(noise_multiplier: float, count: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), count)


def noise_multiplier(epsilon: float, delta: float, compositions: int = 1) -> float:
    """Smallest z such that ``compositions`` Gaussian releases of std z (sensitivity 1) are (ε, δ)-DP."""
    if epsilon <= 0 or not 0 < delta < 1 or compositions < 1:
        raise IfediclError(f"need epsilon > 0, 0 < delta < 1, compositions >= 1 ({epsilon}, {delta}, {compositions})")
    import dp_accounting

    return float(
        dp_accounting.calibrate_dp_mechanism(
            _accountant,
            lambda z: _event(z, compositions),
            target_epsilon=epsilon,
            target_delta=delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(0.2, 500.0),
            tol=1e-4,
        )
    )


def spent_epsilon(releases: list[tuple[float, int]], delta: float) -> float:
    """ε at ``delta`` of the composition of ``(noise_multiplier, count)`` Gaussian releases."""
    events = [_event(z, n) for z, n in releases if n > 0]
    if not events:
        return 0.0
    import dp_accounting

    accountant = _accountant()
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def clip_vector(values: np.ndarray, clip_norm: float) -> np.ndarray:
    """Whole-array L2 clip (the Λ delta)."""
    norm = float(np.linalg.norm(values))
    return values if norm <= clip_norm else values * (clip_norm / norm)


def gaussian_noise(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """N(0, std^2) per coordinate, drawn from ``rng``, which must be seeded from OS entropy
    (``np.random.default_rng()``, as each client actor holds), never from the run's seed: the server
    chooses and records that seed, and noise it can regenerate it can subtract, leaving no privacy.
    tests/test_privacy.py checks the uploads of two identically seeded clients carry different noise.
    """
    return rng.normal(0.0, std, size=shape)


@dataclass(frozen=True)
class ClientPrivacy:
    """A client's own DP policy, fixed when it joins (the server cannot switch it off per request).

    ``*_noise_multiplier`` of 0 means that upload is not privatised.
    """

    vector_clip: float = 0.0  # C_v: per-example L2 bound of the [L, 2, d] contribution
    vector_noise_multiplier: float = 0.0
    coefficient_clip: float = 0.0  # C_Λ: L2 bound of the per-round Λ delta
    coefficient_noise_multiplier: float = 0.0
    # The releases the noise was calibrated for, per run: a client refuses one more (a server asking again and
    # again could average the noise away). One vector release; one Λ release per round.
    vector_releases: int = 1
    coefficient_releases: int = 1

    def budget(self, kind: str) -> int | None:
        """How many noisy releases of ``kind`` ("vectors" | "coefficients") this policy allows (None: no DP)."""
        if kind == "vectors":
            return self.vector_releases if self.vectors_on else None
        return self.coefficient_releases if self.coefficients_on else None

    @property
    def vectors_on(self) -> bool:
        return self.vector_noise_multiplier > 0

    @property
    def coefficients_on(self) -> bool:
        return self.coefficient_noise_multiplier > 0

    def vector_noise_std(self, num_examples: int) -> float:
        """Per-coordinate std on the client's mean: z * 2 C_v / N_k (replace-one sensitivity)."""
        return self.vector_noise_multiplier * 2.0 * self.vector_clip / num_examples

    def coefficient_noise_std(self) -> float:
        """Per-coordinate std on the Λ delta: z * 2 C_Λ (replace-the-client sensitivity)."""
        return self.coefficient_noise_multiplier * 2.0 * self.coefficient_clip

    def privatise_coefficients(self, new: np.ndarray, start: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Λ_g + clip(Λ_k - Λ_g) + noise. [L, 2, 2] -> [L, 2, 2]."""
        delta = clip_vector(new.astype(np.float64) - start.astype(np.float64), self.coefficient_clip)
        delta = delta + gaussian_noise(delta.shape, self.coefficient_noise_std(), rng)
        return (start.astype(np.float64) + delta).astype(np.float32)


@dataclass(frozen=True)
class PrivacySettings:
    """What ``federate --dp-*`` asks for; turned into a :class:`ClientPrivacy` by the accountant."""

    vector_epsilon: float | None = None
    vector_clip: float = 1.0
    coefficient_epsilon: float | None = None  # over all rounds
    coefficient_clip: float = 0.1
    delta: float = 1e-5

    @property
    def enabled(self) -> bool:
        return self.vector_epsilon is not None or self.coefficient_epsilon is not None

    def validate(self) -> None:
        for name, eps, clip in (
            ("vector", self.vector_epsilon, self.vector_clip),
            ("coefficient", self.coefficient_epsilon, self.coefficient_clip),
        ):
            if eps is not None and (eps <= 0 or clip <= 0):
                raise IfediclError(f"--dp-{name}-epsilon and --dp-{name}-clip must be > 0")
        if not 0 < self.delta < 1:
            raise IfediclError(f"--dp-delta must be in (0, 1) (got {self.delta})")

    def client_policy(self, rounds: int) -> ClientPrivacy:
        vec_z = noise_multiplier(self.vector_epsilon, self.delta) if self.vector_epsilon else 0.0
        coef_z = (
            noise_multiplier(self.coefficient_epsilon, self.delta, max(1, rounds)) if self.coefficient_epsilon else 0.0
        )
        return ClientPrivacy(self.vector_clip, vec_z, self.coefficient_clip, coef_z, 1, max(1, rounds))


def privacy_report(settings: PrivacySettings, policy: ClientPrivacy, rounds_participated: int) -> dict:
    """The run's privacy record: settings, noise multipliers and ε spent, per client (worst case)."""
    vec = [(policy.vector_noise_multiplier, 1)] if policy.vectors_on else []
    coef = [(policy.coefficient_noise_multiplier, rounds_participated)] if policy.coefficients_on else []
    return {
        "settings": asdict(settings),
        "accountant": accountant_name(),
        "delta": settings.delta,
        "vectors": {
            "on": policy.vectors_on,
            "clip": policy.vector_clip,
            "noise_multiplier": policy.vector_noise_multiplier,
            "unit": "one example replaced; std per coordinate = z * 2 * clip / N_k",
            "epsilon": spent_epsilon(vec, settings.delta) if vec else None,
        },
        "coefficients": {
            "on": policy.coefficients_on,
            "clip": policy.coefficient_clip,
            "noise_multiplier": policy.coefficient_noise_multiplier,
            "rounds": rounds_participated,
            "unit": "a client's whole data replaced; std per coordinate = z * 2 * clip",
            "epsilon": spent_epsilon(coef, settings.delta) if coef else None,
        },
        "total_epsilon": spent_epsilon(vec + coef, settings.delta) if vec or coef else None,
    }
