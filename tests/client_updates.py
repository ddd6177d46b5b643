"""Two clients' uploads of Λ for the tests of server-side round rules (server optimizers, tail averaging)."""

from __future__ import annotations

import numpy as np

from ifedicl.federation_job.strategies import ClientUpdate

SHAPE = (2, 2, 2)  # a stand-in Λ: [L=2, 2, 2]


def two_clients_around(value: float) -> list[ClientUpdate]:
    """Two clients of one example each whose mean is ``value`` everywhere (their values: value ∓ 1)."""
    return [
        ClientUpdate(0, np.full(SHAPE, value - 1.0, np.float32), 1),
        ClientUpdate(1, np.full(SHAPE, value + 1.0, np.float32), 1),
    ]
