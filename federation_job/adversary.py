"""Misbehaving clients for drills and tests: honest computation, then a tampered upload.

Why in the package: Ray actors are built from importable classes, and a robustness
claim is only as good as the attack it was run against. Selected per client through
``FederationSettings.adversaries`` (``{client_id: "scale:50,flip"}``), recorded in
the run's settings like every other setting; never used unless asked for.

Modes (comma-separated): ``scale:F`` multiplies the vectors by F; ``flip`` negates Λ
(β -> -β inverts every block's output; in a second-order round, the statistics); ``nan`` uploads NaNs
in all; ``hang:S`` is a stuck client: alive, but it sits S seconds on every calibration request
before answering (the server must drop it at its round timeout, not wait). Malformed uploads (the server must
reject them and go on, issue 31): ``count:X`` reports X examples (``count:1e400`` reaches the
server as JSON's 1e400, i.e. inf; a Λ frame cannot carry that, so its Λ goes as safetensors);
``pad:N`` adds N bytes of metadata to every upload (beyond what any request needs).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ifedicl.federation_job import wire
from ifedicl.federation_job.actors import HostedClient
from ifedicl.kernel.errors import IfediclError

MODES = ("scale", "flip", "nan", "hang", "count", "pad")


def parse_modes(spec: str) -> dict[str, float]:
    modes: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, arg = part.partition(":")
        if name not in MODES:
            raise IfediclError(f"unknown adversary mode {name!r} (known: {MODES})")
        modes[name] = float(arg) if arg else 1.0
    return modes


class AdversarialClient(HostedClient):
    """A hosted client that tampers with its uploads (its host holds no other client)."""

    modes: dict[str, float]

    def arm(self, adversary: str) -> None:
        self.modes = parse_modes(adversary)

    def _vectors(self, meta: dict) -> np.ndarray:
        vectors = super()._vectors(meta)
        if "nan" in self.modes:
            return np.full_like(vectors, np.nan)
        return vectors * self.modes.get("scale", 1.0)

    def _coefficients(self, arrays: dict, meta: dict) -> tuple[np.ndarray, float]:
        coefficients, loss = super()._coefficients(arrays, meta)
        time.sleep(self.modes.get("hang", 0.0))
        if "nan" in self.modes:
            return np.full_like(coefficients, np.nan), loss
        return (-coefficients if "flip" in self.modes else coefficients), loss

    def _curvature(self, arrays: dict, meta: dict) -> tuple[np.ndarray, float, dict]:
        """A second-order round's statistics, tampered alike: ``flip`` negates them (an uphill gradient, a
        negative definite matrix), ``nan`` replaces them, ``hang`` stalls. A held-out report stays honest."""
        statistics, loss, report = super()._curvature(arrays, meta)
        time.sleep(self.modes.get("hang", 0.0))
        if "nan" in self.modes:
            return np.full_like(statistics, np.nan), loss, report
        if "flip" in self.modes:  # the losses stay plausible; the gradient and the matrix change sign
            statistics = np.concatenate([statistics[:2], -statistics[2:]])
        return statistics, loss, report

    def _answer(self, key: str, value: np.ndarray, meta: dict, **extra) -> bytes:
        """The honest upload, its facts rewritten: ``count`` claims another example count, ``pad`` bloats it."""
        payload = super()._answer(key, value, meta, **extra)
        if "count" not in self.modes and "pad" not in self.modes:
            return payload
        arrays, facts = wire.decode(payload)
        if "count" in self.modes:  # a whole count is claimed as an integer: a plausible lie, not a malformed one
            count = self.modes["count"]
            facts["num_examples"] = int(count) if math.isfinite(count) and count.is_integer() else count
        if "pad" in self.modes:
            facts["padding"] = "x" * int(self.modes["pad"])
        return wire.encode(arrays, **facts)
