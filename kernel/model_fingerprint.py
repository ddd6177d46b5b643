"""What a stored run records of the model it was made with: a plain record, no torch.

:mod:`ifedicl.kernel.modeling` computes it (:func:`~ifedicl.kernel.modeling.fingerprint`, which needs the
model's config); the store only writes, reads and compares it, so it lives here where importing it
costs nothing (``ifedicl runs`` reads the store without starting torch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFingerprint:
    """What a stored run must match to be applied to a model."""

    model_id: str
    num_layers: int
    hidden_size: int
    config_hash: str
