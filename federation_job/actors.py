"""Ray actors hosting the clients. Thin: each :class:`HostedClient` is a :class:`Client` that speaks bytes.

A :class:`ClientHost` is one Ray actor: it loads the frozen model once (from the node's shared
object-store copy, or its own copy from a path) and hosts any number of clients, serving their
calls one after another (Ray's ``max_concurrency=1``). Each hosted client reads its own data
where it runs (:class:`~ifedicl.kernel.sources.ClientSource`), keeps its own vectors, DP noise,
secrets and LoRA state, and returns only encoded vectors, Λ and evaluation counts. So a thousand
clients run on a few processes (Flower's virtual clients), and one client per organisation's node
is the same code with one client per host. Everything a client receives and sends is a ``bytes``
payload from :mod:`ifedicl.federation_job.wire`, so the driver can count exactly what crossed.

Each answer carries the CPU and wall seconds the request took, measured in the host process
(:mod:`ifedicl.federation_job.compute`): a host serves one request at a time, so that is this
client's compute.

FedAvg-LoRA runs on the same hosts: :meth:`HostedClient.train_lora` trains LoRA adapters locally
(:class:`ifedicl.federation_job.lora.LoraClient`) instead of calibrating Λ; a client serves one
method per run. The host attaches the adapters to its model once; each client's round loads the
global adapters into them before training, so hosted clients never see each other's.

Trust options live here, on the client's side of the boundary: its differential privacy policy is
fixed when it joins (the server cannot switch it off per request), and under secure aggregation
its value stays here until it leaves masked.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Callable

import numpy as np
import torch

from ifedicl.federation_job import wire
from ifedicl.federation_job.client import CalibrationConfig, Client, class_counts, round_passes
from ifedicl.federation_job.compute import measured
from ifedicl.federation_job.early_stopping import holdout_rows
from ifedicl.federation_job.privacy import ClientPrivacy
from ifedicl.federation_job.secagg import MaskingClient
from ifedicl.federation_job.vector_coding import encode_vectors
from ifedicl.kernel.data import Split
from ifedicl.kernel.errors import FederationError
from ifedicl.kernel.modeling import DTYPES, SharedWeights, load_model, load_tokenizer, model_from_weights
from ifedicl.kernel.sources import ClientSource
from ifedicl.kernel.task import TaskSpec
from ifedicl.model_patches.hf import HFContextModel

# What the server may ask a hosted client to do (ClientHost.call refuses anything else).
REQUESTS = (
    "extract", "set_global_vectors", "calibrate", "curvature", "train_lora", "evaluate",
    "secagg_keys", "secagg_share", "secagg_upload", "secagg_unmask",
)  # fmt: skip


class HostedClient:
    """One client on a host: its data, its vectors and secrets, its requests (bytes in, bytes out)."""

    def __init__(
        self,
        client_id: int,
        client: Client,
        test: Split,
        privacy: ClientPrivacy | None = None,
        lora_model: Callable[[object], object] | None = None,
    ):
        self.client_id = client_id
        self.client = client
        self.test = test  # its held-out split, scored by :meth:`evaluate` (empty: none)
        self.privacy = privacy or ClientPrivacy()
        self.noise_rng = np.random.default_rng()  # OS entropy: the server knows the run's seeds, not this
        self.vectors: np.ndarray | None = None
        self.pending: np.ndarray | None = None  # secure aggregation: the value awaiting its masked upload
        self.masker: MaskingClient | None = None
        self.released = {"vectors": 0, "coefficients": 0}  # noisy releases made this run (the DP budget's use)
        self.lora = None  # a LoraClient once this client trains FedAvg-LoRA
        self._lora_model = lora_model  # the host's model with adapters attached (once per host)

    @property
    def dtype(self) -> str:
        return str(next(self.client.ctx.model.parameters()).dtype).removeprefix("torch.")

    # ------------------------------------------------------------------ local computation
    def _release(self, kind: str) -> None:
        """Count one noisy release of ``kind``; refuse it past the budget the run's DP noise was calibrated for."""
        budget = self.privacy.budget(kind)
        if budget is not None and self.released[kind] >= budget:
            raise FederationError(
                f"client {self.client_id}: its differential-privacy budget covers {budget} release(s) of {kind} "
                "per run; refused another (repeated noisy releases would average the noise away)"
            )
        self.released[kind] += 1

    def _vectors(self, meta: dict) -> np.ndarray:
        """v_k [L, 2, d], clipped per example and noised if this client's policy says so."""
        # Autocast only lowers precision: a bfloat16 model asked for float32 forwards runs as it is
        # (CPU autocast refuses float32 and warned on every batch).
        extract = meta.get("extract_dtype")
        autocast = DTYPES[extract] if extract and self.dtype == "float32" and extract != "float32" else None
        clip = self.privacy.vector_clip if self.privacy.vectors_on else None
        limit = meta.get("max_examples")
        train, _ = self._holdout_split(meta)  # early stopping's held-out rows stay out of the vectors too
        vectors = self.client.extract_vectors(
            int(meta.get("batch_size", 8)),
            autocast_dtype=autocast,
            clip_norm=clip,
            max_examples=None if limit is None else int(limit),
            rows=train,
        )
        if self.privacy.vectors_on:
            self._release("vectors")
            used = len(train) if limit is None else min(len(train), int(limit))
            std = self.privacy.vector_noise_std(used)
            vectors = (vectors + self.noise_rng.normal(0.0, std, vectors.shape)).astype(np.float32)
        return vectors

    def _coefficients(self, arrays: dict, meta: dict) -> tuple[np.ndarray, float]:
        """Λ_k [L, 2, 2] after local calibration; the delta clipped and noised if the policy says so."""
        if self.vectors is None:
            raise FederationError(f"client {self.client_id} has no global vectors yet")
        config, seed = self._round_config(meta)
        start = arrays["coefficients"]
        result = self.client.calibrate(self.vectors, start, config, seed)
        coefficients = result.coefficients
        if self.privacy.coefficients_on:
            self._release("coefficients")
            coefficients = self.privacy.privatise_coefficients(coefficients, start, self.noise_rng)
        return coefficients, result.mean_loss

    def _round_config(self, meta: dict) -> tuple[CalibrationConfig, int]:
        """A round request's calibration settings and this client's seed for it."""
        config = CalibrationConfig(**meta["config"]) if isinstance(meta.get("config"), dict) else CalibrationConfig()
        return config, int(meta.get("seed", 0)) * 1000 + self.client_id

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
        if key == "curvature":  # means over this round's examples: float32 is exact enough for a step direction
            return wire.encode({key: value.astype(np.float32)}, num_examples=num_examples, **extra)
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
            balanced = meta.get("stage1") == "class-balanced"
            extracted = self._class_means(meta) if balanced else self._vectors(meta)
        if not balanced:
            return self._answer("vectors", extracted, meta, compute=compute)
        means, counts = extracted  # [C, L, 2, d], [C]: coded as [C*L, 2, d] in the request's coding
        classes, layers, blocks, hidden = means.shape
        coding = str(meta.get("vector_coding", "float32"))
        coded = encode_vectors(means.reshape(classes * layers, blocks, hidden), coding)
        return wire.encode({**coded, "class_counts": counts}, num_examples=len(self.client.data), compute=compute)

    def _class_means(self, meta: dict) -> tuple[np.ndarray, np.ndarray]:
        """Class-balanced stage 1 (:mod:`~ifedicl.federation_job.class_balanced`): per-class means and counts."""
        if self.privacy.vectors_on or meta.get("secagg"):
            raise FederationError(f"client {self.client_id}: class-balanced stage 1 has no DP or secure aggregation")
        limit = meta.get("max_examples")
        extract = meta.get("extract_dtype")
        autocast = DTYPES[extract] if extract and self.dtype == "float32" and extract != "float32" else None
        train, _ = self._holdout_split(meta)
        return self.client.extract_class_means(
            int(meta.get("batch_size", 8)), autocast, None if limit is None else int(limit), rows=train
        )

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

    def curvature(self, payload: bytes) -> bytes:
        """A second-order round (:mod:`~ifedicl.federation_job.second_order`): the label-only loss, its gradient
        and Gauss-Newton matrix at the global Λ over this round's window of the shard (and the loss at the
        previous Λ, if sent), as one flat upload of means."""
        self._require_method(lora=False)
        with measured() as compute:
            arrays, meta = wire.decode(payload)
            statistics, loss, report = self._curvature(arrays, meta)
        return self._answer("curvature", statistics, meta, loss=loss, compute=compute, **report)

    def _curvature(self, arrays: dict, meta: dict) -> tuple[np.ndarray, float, dict]:
        """The packed statistics [stats_size(P)] of this round's window, the loss at the global Λ, and (early
        stopping) the held-out report."""
        from ifedicl.federation_job.second_order import curvature_stats

        if self.vectors is None:
            raise FederationError(f"client {self.client_id} has no global vectors yet")
        if self.privacy.coefficients_on:
            raise FederationError(f"client {self.client_id}: a second-order round has no differential privacy")
        config, seed = self._round_config(meta)
        train, held = self._holdout_split(meta)
        passes = round_passes(len(train), config, random.Random(seed))
        rows = sorted({train[i] for order in passes for i in order})  # this round's window, each example once
        batch_size = int(meta.get("batch_size", 8))
        stats = curvature_stats(
            self.client, self.vectors, arrays["coefficients"], rows, arrays.get("previous"),
            batch_size, str(meta.get("curvature", "exact")), seed, float(meta.get("check_fraction", 1.0)),
            bool(meta.get("spread", False)), float(meta.get("curvature_fraction", 1.0)),
        )  # fmt: skip
        report = {}
        if held:  # early stopping: the round's starting Λ scored on rows no round trains on
            held_loss = self.client.evaluate_loss(self.vectors, arrays["coefficients"], batch_size, rows=held)
            report = {"holdout_loss": held_loss, "holdout_examples": len(held)}
        return stats.pack(), stats.loss, report

    def _holdout_split(self, meta: dict) -> tuple[list[int], list[int]]:
        """(rows the rounds train on, held-out rows): the whole shard and none unless the run stops early."""
        spec = meta.get("holdout")
        if not isinstance(spec, dict):
            return list(range(len(self.client.data))), []
        seed = int(spec["seed"]) * 1000 + self.client_id  # the same split every round of the run
        return holdout_rows(len(self.client.data), float(spec["fraction"]), seed)

    def train_lora(self, payload: bytes) -> bytes:
        """FedAvg-LoRA: start from the global adapters received, train them locally, upload them (named tensors)."""
        from ifedicl.federation_job.lora import LoraClient, LoraSettings

        with measured() as compute:
            arrays, meta = wire.decode(payload)
            if self.lora is None:  # first round: the host's model with adapters attached
                if self.vectors is not None:
                    raise FederationError(f"client {self.client_id} already serves IFed-ICL in this run")
                settings = LoraSettings(**meta["lora"])
                self.lora = LoraClient(self.client, settings, self._lora_model(settings))
            config = CalibrationConfig(**meta["config"])
            seed = int(meta.get("seed", 0)) * 1000 + self.client_id
            result = self.lora.train(arrays, config, seed)
        num_examples = len(self.client.data)
        return wire.encode(result.state, num_examples=num_examples, loss=result.mean_loss, compute=compute)

    def evaluate(self, payload: bytes) -> bytes:
        """Federated evaluation on this client's held-out split -> per-class counts (never the examples).

        The request names what to score: ``coefficients`` [L, 2, 2] with this client's global vectors
        (and, for a recalibration's guardrail, ``live_vectors``/``live_coefficients``); zero-shot always.
        """
        with measured() as compute:
            arrays, _ = wire.decode(payload)
            if self.vectors is None:
                raise FederationError(f"client {self.client_id} has no global vectors yet")
            c = self.client
            counts = {}
            counts["zero_shot"], counts["total"] = class_counts(c.ctx, c.tokenizer, c.task, self.test)
            scored = {"injected": (self.vectors, arrays["coefficients"])}
            if "live_coefficients" in arrays:
                scored["live"] = (arrays["live_vectors"], arrays["live_coefficients"])
            for name, (vectors, coefficients) in scored.items():
                counts[name], _ = class_counts(c.ctx, c.tokenizer, c.task, self.test, vectors, coefficients)
        return wire.encode({k: v.astype(np.int64) for k, v in counts.items()}, compute=compute)

    # ------------------------------------------------------------------ secure aggregation
    def secagg_keys(self, payload: bytes) -> bytes:
        """A fresh masking client for this round (two key pairs, a self-mask seed); only public keys leave."""
        if self.pending is None:
            raise FederationError(f"client {self.client_id} has nothing to aggregate")
        self.masker = MaskingClient(self.client_id, self.pending)
        self.pending = None  # masked once: two sums over different cohorts would differ by this value
        return self.masker.secagg_keys(payload)

    def secagg_share(self, payload: bytes) -> bytes:
        """The cohort's keys and threshold -> this client's secrets, Shamir-shared and encrypted to each peer."""
        if self.masker is None:
            raise FederationError(f"client {self.client_id}: no keys advertised for this aggregation")
        return self.masker.secagg_share(payload)

    def secagg_upload(self, payload: bytes) -> bytes:
        """The peers' encrypted shares -> the pending value, self-masked and pairwise-masked. -> uint64[size]."""
        if self.masker is None:
            raise FederationError(f"client {self.client_id}: no keys advertised for this aggregation")
        return self.masker.secagg_upload(payload)

    def secagg_unmask(self, payload: bytes) -> bytes:
        """Who uploaded, who dropped -> its shares of their seeds or keys (never both kinds for one peer)."""
        if self.masker is None:
            raise FederationError(f"client {self.client_id}: no keys advertised for this aggregation")
        return self.masker.secagg_unmask(payload)


class ClientHost:
    """Made remote by the pool (``ray.remote(ClientHost)``) with its resource options: one model, many clients.

    A driver that federates again in the same Ray may keep a host between runs
    (:class:`ifedicl.federation_job.ray_pool.WarmActors`): :meth:`leave` drops the model and every
    client, :meth:`rejoin` loads the next run's model as the constructor would. Only the process
    and its imports survive a run.
    """

    def __init__(self, *host_args, **host_kwargs):
        self._load(*host_args, **host_kwargs)

    def _load(self, model: SharedWeights | str, tokenizer_id: str, dtype: str = "float32", device: str = "cpu") -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        module = load_model(model, dtype, device) if isinstance(model, str) else model_from_weights(model).to(device)
        self.ctx = HFContextModel(module)  # one set of hooks, shared by the hosted clients (one request at a time)
        self.tokenizer = load_tokenizer(tokenizer_id)
        self.clients: dict[int, HostedClient] = {}
        self.lora_model = None  # the model with LoRA adapters, attached on a client's first LoRA round

    def rejoin(self, *host_args, **host_kwargs) -> bool:
        """A kept host loads another run's model (the constructor's arguments)."""
        self._load(*host_args, **host_kwargs)
        return True

    def leave(self) -> bool:
        """Drop the run: its model (and the object-store weights it maps) and every client's data, vectors
        and secrets. The process stays, with its imports, for :meth:`rejoin`."""
        self.__dict__.clear()  # every attribute is the run's (_load sets them all)
        gc.collect()
        return True

    def join(
        self,
        client_id: int,
        source: ClientSource,
        task: TaskSpec,
        privacy: ClientPrivacy | None = None,
        adversary: str = "",
    ) -> bytes:
        """Client ``client_id`` joins: it reads and validates its own data here -> its profile (counts only).

        A data problem raises :class:`~ifedicl.kernel.errors.DataError` naming the client; the pool
        records it as that client's drop, and the host keeps serving its other clients.
        """
        data = source.load(task)
        client = Client(self.ctx, self.tokenizer, task, data.train)
        kind = HostedClient
        if adversary:
            from ifedicl.federation_job.adversary import AdversarialClient

            kind = AdversarialClient
        hosted = kind(client_id, client, data.test, privacy, self._lora_model)
        if adversary:
            hosted.arm(adversary)
        self.clients[client_id] = hosted
        return wire.encode({}, **source.profile(data).to_dict())

    def call(self, method: str, client_id: int, payload: bytes) -> bytes | bool:
        """Client ``client_id``'s ``method(payload)``: every server request goes through here."""
        if method not in REQUESTS:
            raise FederationError(f"unknown client request {method!r}")
        client = self.clients.get(client_id)
        if client is None:
            raise FederationError(f"client {client_id} is not hosted here")
        return getattr(client, method)(payload)

    def _lora_model(self, settings):
        """The host's model with LoRA adapters, attached once whichever hosted client trains first."""
        from ifedicl.federation_job.lora import attach_lora

        if self.lora_model is None:
            self.lora_model = attach_lora(self.ctx.model, settings)
        return self.lora_model
