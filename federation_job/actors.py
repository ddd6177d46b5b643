"""Ray actors playing the clients. Thin: a :class:`Client` that speaks bytes.

Each actor loads the frozen model once (from the node's shared object-store copy,
or its own copy from a path), loads its own shard of data from disk, and returns
only encoded vectors and Λ. Everything it receives and sends is a ``bytes``
payload from :mod:`ifedicl.federation_job.wire`, so the driver can count exactly what
crossed the boundary.

Each answer carries the CPU and wall seconds the actor spent on the request, measured
in the actor's own process (:mod:`ifedicl.federation_job.compute`): the run's client compute is
what the clients report, not the driver's view of the round.

FedAvg-LoRA runs on the same actors: :meth:`ClientActor.train_lora` trains LoRA adapters
locally (:class:`ifedicl.federation_job.lora.LoraClient`) instead of calibrating Λ; an actor
serves one method per run.

Trust options live here, on the client's side of the boundary: its differential
privacy policy is fixed when it joins (the server cannot switch it off per request),
and under secure aggregation its value stays here until it leaves masked.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import torch

from ifedicl.federation_job import wire
from ifedicl.federation_job.client import CalibrationConfig, Client
from ifedicl.federation_job.compute import measured
from ifedicl.federation_job.privacy import ClientPrivacy
from ifedicl.federation_job.secagg import MaskingClient
from ifedicl.federation_job.vector_coding import encode_vectors
from ifedicl.kernel.errors import FederationError
from ifedicl.kernel.modeling import DTYPES, SharedWeights, load_model, load_tokenizer, model_from_weights
from ifedicl.kernel.sources import DataSource
from ifedicl.model_patches.hf import HFContextModel


class ClientActor:
    """Made remote by the driver (``ray.remote(ClientActor)``) with its resource options.

    A driver that federates again in the same Ray may keep an actor between runs
    (:class:`ifedicl.federation_job.ray_pool.WarmActors`): :meth:`leave` drops everything of
    the run's client, :meth:`rejoin` builds the next run's client as the constructor would.
    Only the process and its imports survive a run.
    """

    def __init__(self, *client_args, **client_kwargs):
        self._join(*client_args, **client_kwargs)

    def _join(
        self,
        client_id: int,
        model: SharedWeights | str,
        tokenizer_id: str,
        source: DataSource,
        indices: list[int],
        dtype: str = "float32",
        device: str = "cpu",
        privacy: ClientPrivacy | None = None,
    ) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.client_id = client_id
        self.dtype = dtype
        module = load_model(model, dtype, device) if isinstance(model, str) else model_from_weights(model).to(device)
        data = source.load()
        self.client = Client(
            HFContextModel(module), load_tokenizer(tokenizer_id), data.task, data.train.subset(indices)
        )
        self.privacy = privacy or ClientPrivacy()
        self.noise_rng = np.random.default_rng()  # OS entropy: the server knows the run's seeds, not this
        self.vectors: np.ndarray | None = None
        self.pending: np.ndarray | None = None  # secure aggregation: the value awaiting its masked upload
        self.masker: MaskingClient | None = None
        self.lora = None  # a LoraClient once this actor trains FedAvg-LoRA (its model then carries adapters)

    def ready(self) -> int:
        """Number of local examples (the only fact about the data the server learns)."""
        return len(self.client.data)

    def rejoin(self, *client_args, **client_kwargs) -> int:
        """A kept actor becomes another run's client (the constructor's arguments) -> :meth:`ready`."""
        self._join(*client_args, **client_kwargs)
        return self.ready()

    def leave(self) -> bool:
        """Drop the run's client: its model (and the object-store weights it maps), its data, vectors and
        secrets. The process stays, with its imports, for :meth:`rejoin`."""
        self.__dict__.clear()  # every attribute is the client's (_join sets them all)
        gc.collect()
        return True

    # ------------------------------------------------------------------ local computation
    def _vectors(self, meta: dict) -> np.ndarray:
        """v_k [L, 2, d], clipped per example and noised if this client's policy says so."""
        # Autocast only lowers precision: a bfloat16 model asked for float32 forwards runs as it is
        # (CPU autocast refuses float32 and warned on every batch).
        extract = meta.get("extract_dtype")
        autocast = DTYPES[extract] if extract and self.dtype == "float32" and extract != "float32" else None
        clip = self.privacy.vector_clip if self.privacy.vectors_on else None
        limit = meta.get("max_examples")
        vectors = self.client.extract_vectors(
            int(meta.get("batch_size", 8)),
            autocast_dtype=autocast,
            clip_norm=clip,
            max_examples=None if limit is None else int(limit),
        )
        if self.privacy.vectors_on:
            used = len(self.client.data) if limit is None else min(len(self.client.data), int(limit))
            std = self.privacy.vector_noise_std(used)
            vectors = (vectors + self.noise_rng.normal(0.0, std, vectors.shape)).astype(np.float32)
        return vectors

    def _coefficients(self, arrays: dict, meta: dict) -> tuple[np.ndarray, float]:
        """Λ_k [L, 2, 2] after local calibration; the delta clipped and noised if the policy says so."""
        if self.vectors is None:
            raise FederationError(f"client {self.client_id} has no global vectors yet")
        config = CalibrationConfig(**meta["config"]) if isinstance(meta.get("config"), dict) else CalibrationConfig()
        seed = int(meta.get("seed", 0)) * 1000 + self.client_id
        start = arrays["coefficients"]
        result = self.client.calibrate(self.vectors, start, config, seed)
        coefficients = result.coefficients
        if self.privacy.coefficients_on:
            coefficients = self.privacy.privatise_coefficients(coefficients, start, self.noise_rng)
        return coefficients, result.mean_loss

    def _answer(self, key: str, value: np.ndarray, meta: dict, **extra) -> bytes:
        """The plain upload, or (secure aggregation) only the count, keeping the value for masking.

        In the clear, vectors travel in the coding the request names (``vector_coding``, after any
        DP noise) and Λ as a fixed binary frame (:func:`~ifedicl.federation_job.wire.encode_coefficients`).
        """
        num_examples = len(self.client.data)
        if meta.get("secagg"):
            self.pending = value.astype(np.float64) * (num_examples if meta.get("weighted") else 1)
            return wire.encode({}, num_examples=num_examples, **extra)
        if key == "coefficients":
            return wire.encode_coefficients(value, num_examples, **extra)
        arrays = encode_vectors(value, str(meta.get("vector_coding", "float32")))
        return wire.encode(arrays, num_examples=num_examples, **extra)

    def _require_method(self, lora: bool) -> None:
        if (self.lora is not None) != lora:
            raise FederationError(f"client {self.client_id} already serves another method in this run")

    # ------------------------------------------------------------------ requests
    def extract(self, payload: bytes) -> bytes:
        self._require_method(lora=False)
        with measured() as compute:
            _, meta = wire.decode(payload)
            vectors = self._vectors(meta)
        return self._answer("vectors", vectors, meta, compute=compute)

    def set_global_vectors(self, payload: bytes) -> bool:
        arrays, _ = wire.decode(payload)
        self.vectors = arrays["vectors"]
        return True

    def calibrate(self, payload: bytes) -> bytes:
        self._require_method(lora=False)
        with measured() as compute:
            arrays, meta = wire.decode(payload)
            coefficients, loss = self._coefficients(arrays, meta)
        return self._answer("coefficients", coefficients, meta, loss=loss, compute=compute)

    def train_lora(self, payload: bytes) -> bytes:
        """FedAvg-LoRA: start from the global adapters received, train them locally, upload them (named tensors)."""
        from ifedicl.federation_job.lora import LoraClient, LoraSettings

        with measured() as compute:
            arrays, meta = wire.decode(payload)
            if self.lora is None:  # first round: adapters attached in place to this actor's model
                if self.vectors is not None:
                    raise FederationError(f"client {self.client_id} already serves IFed-ICL in this run")
                self.lora = LoraClient(self.client, LoraSettings(**meta["lora"]))
            config = CalibrationConfig(**meta["config"])
            seed = int(meta.get("seed", 0)) * 1000 + self.client_id
            result = self.lora.train(arrays, config, seed)
        num_examples = len(self.client.data)
        return wire.encode(result.state, num_examples=num_examples, loss=result.mean_loss, compute=compute)

    # ------------------------------------------------------------------ secure aggregation
    def secagg_keys(self, payload: bytes) -> bytes:
        """A fresh key pair per masking attempt; only the public half leaves."""
        if self.pending is None:
            raise FederationError(f"client {self.client_id} has nothing to aggregate")
        self.masker = MaskingClient(self.client_id)
        return wire.encode({"public_key": self.masker.public_key()})

    def secagg_upload(self, payload: bytes) -> bytes:
        """The pending value plus pairwise masks with the cohort named in the request. -> uint64[size]."""
        arrays, meta = wire.decode(payload)
        if self.masker is None or self.pending is None:
            raise FederationError(f"client {self.client_id}: no key agreed for this attempt")
        cohort = [int(c) for c in meta["cohort"]]
        peers = dict(zip(cohort, arrays["public_keys"]))
        masked = self.masker.mask(self.pending, peers, str(meta["context"]).encode())
        self.masker = None  # one upload per key pair: a retry gets fresh keys
        return wire.encode({"masked": masked})
