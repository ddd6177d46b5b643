"""Ray actors playing the clients. Thin: a :class:`Client` that speaks bytes.

Each actor loads the frozen model once (from the node's shared object-store copy,
or its own copy from a path), loads its own shard of data from disk, and returns
only encoded vectors and Λ. Everything it receives and sends is a ``bytes``
payload from :mod:`federation_job.wire`, so the driver can count exactly what
crossed the boundary.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from federation_job import wire
from federation_job.client import CalibrationConfig, Client
from federation_job.errors import FederationError
from federation_job.modeling import DTYPES, SharedWeights, load_model, load_tokenizer, model_from_weights
from federation_job.sources import DataSource
from model_patches.hf import HFContextModel


class ClientActor:
    """Made remote by the driver (``ray.remote(ClientActor)``) with its resource options."""

    def __init__(
        self,
        client_id: int,
        model: SharedWeights | str,
        tokenizer_id: str,
        source: DataSource,
        indices: list[int],
        dtype: str = "float32",
        device: str = "cpu",
    ):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.client_id = client_id
        self.dtype = dtype
        module = load_model(model, dtype, device) if isinstance(model, str) else model_from_weights(model).to(device)
        data = source.load()
        self.client = Client(
            HFContextModel(module), load_tokenizer(tokenizer_id), data.task, data.train.subset(indices)
        )
        self.vectors: np.ndarray | None = None

    def ready(self) -> int:
        """Number of local examples (the only fact about the data the server learns)."""
        return len(self.client.data)

    def extract(self, payload: bytes) -> bytes:
        _, meta = wire.decode(payload)
        autocast = meta.get("extract_dtype")
        autocast = DTYPES[autocast] if autocast and autocast != self.dtype else None
        vectors = self.client.extract_vectors(int(meta.get("batch_size", 8)), autocast_dtype=autocast)
        return wire.encode({"vectors": vectors}, num_examples=len(self.client.data))

    def set_global_vectors(self, payload: bytes) -> bool:
        arrays, _ = wire.decode(payload)
        self.vectors = arrays["vectors"]
        return True

    def calibrate(self, payload: bytes) -> bytes:
        if self.vectors is None:
            raise FederationError(f"client {self.client_id} has no global vectors yet")
        arrays, meta = wire.decode(payload)
        config = CalibrationConfig(**meta["config"]) if isinstance(meta.get("config"), dict) else CalibrationConfig()
        seed = int(meta.get("seed", 0)) * 1000 + self.client_id
        result = self.client.calibrate(self.vectors, arrays["coefficients"], config, seed)
        return wire.encode(
            {"coefficients": result.coefficients}, num_examples=len(self.client.data), loss=result.mean_loss
        )
