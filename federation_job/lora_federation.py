"""FedAvg-LoRA through the same Ray job as IFed-ICL: the baseline measured like for like.

The same :class:`~ifedicl.federation_job.driver.Federation` (actors, client sampling, drop and
timeout handling, ``min_clients``, screening and aggregators, store rows per round,
client-reported CPU and wall seconds) with the method's stages swapped: no stage 1
(round 0 only records who loaded), then each round the server sends the global LoRA
adapters, every sampled client trains them locally (:meth:`ClientActor.train_lora`) and
uploads its adapters; the server averages them (FedAvg, or the robust aggregators, on the
flattened state). Bytes are ``len()`` of those wire payloads, exactly as for Λ.

Not offered: secure aggregation and differential privacy (their clipping bounds and
masking are defined for vectors and Λ), and publishing (a LoRA run has no context
vectors to serve).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import ray
from tqdm.auto import tqdm

from ifedicl.federation_job import wire
from ifedicl.federation_job.driver import Federation
from ifedicl.federation_job.exchange import RoundOutcome, Traffic
from ifedicl.federation_job.federation_settings import DEFAULTS
from ifedicl.federation_job.lora import LoraSettings, attach_lora, flatten, load_trainable, trainable_state, unflatten
from ifedicl.federation_job.options import LAMBDA_ROUND_FIELDS
from ifedicl.federation_job.strategies import ClientUpdate, RoundId, check_update
from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.modeling import load_model, model_from_weights
from ifedicl.storage.records import RoundRecord


class LoraFederation(Federation):
    """``LoraFederation(model, source, store, settings, lora=LoraSettings(...)).run()``.

    ``states[r]`` holds the global adapters after round r (0: the initial ones).
    """

    def __init__(self, model_id, clients, store_uri, settings, *args, lora: LoraSettings | None = None, **kwargs):
        # Its rounds train the adapters locally and average them by definition: the second-order round is Λ's.
        lambda_rounds = {name: getattr(DEFAULTS, name) for name in LAMBDA_ROUND_FIELDS}
        lambda_rounds.update(stage2="local-steps", holdout_fraction=0.0, average_rounds=1)
        settings = dataclasses.replace(settings, **lambda_rounds)
        super().__init__(model_id, clients, store_uri, settings, *args, **kwargs)
        s = self.settings
        if s.secagg or self.privacy.vectors_on or self.privacy.coefficients_on:
            raise IfediclError("FedAvg-LoRA runs without --secagg and differential privacy (defined for vectors and Λ)")
        self.lora = lora or LoraSettings()
        self.states: list[dict[str, np.ndarray]] = []  # the global adapters after each round (0 = initial)

    def _run_settings(self) -> dict:
        return {**super()._run_settings(), "method": "fedavg-lora", "lora": dataclasses.asdict(self.lora)}

    def _base_model(self):
        """A model for the driver's own use: aliases the object-store weights (no copy) or loads its own."""
        if self.shared_weights is not None:
            return model_from_weights(ray.get(self.shared_weights))
        return load_model(self.model_id, self.settings.dtype)

    def _stages(self) -> tuple[None, None]:
        # no stage 1: round 0 records who loaded (and who was dropped while loading), no bytes, no seconds
        now = time.monotonic()
        loaded = RoundOutcome(0, sorted(self.pool.actors), sorted(self.alive), dict(self.load_dropped), Traffic(), now)
        self._record(loaded.record(finished=now))
        state = trainable_state(attach_lora(self._base_model(), self.lora))
        self.states = [state]
        rng = np.random.default_rng(self.settings.seed)
        for r in tqdm(range(1, self.settings.rounds + 1), desc="rounds", unit="round"):
            state, record = self.lora_round(r, state, rng)
            self._record(record)
            self.states.append(state)
        return None, None

    def _decode_states(
        self, answers: dict[int, object], like: dict[str, np.ndarray]
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        """Uploaded adapters -> flattened, checked updates; anything else is a recorded rejection.

        Untrusted like every upload: the size is checked before decoding (float32 adapters of the
        global state's names and shapes), then the names, shapes and dtypes, the reported
        count and loss (:func:`wire.upload_facts`) and the values (:func:`check_update`).
        """
        size = sum(v.size for v in like.values())
        limit = wire.upload_limit(size, tensors=len(like))
        updates, rejected = [], {}
        for cid, payload in sorted(answers.items()):
            try:
                arrays, meta = wire.decode(wire.check_size(payload, limit, cid))
                if sorted(arrays) != sorted(like) or any(arrays[n].shape != like[n].shape for n in like):
                    raise IfediclError(f"client {cid} sent tensors that are not the global adapters")
                if any(arrays[n].dtype != like[n].dtype for n in like):
                    raise IfediclError(f"client {cid} sent adapters in another dtype than the global ones")
                num_examples, loss = wire.upload_facts(meta, cid)
                update = ClientUpdate(cid, flatten(arrays), num_examples, loss)
                check_update(update, (size,))
                updates.append(update)
            except IfediclError as err:
                rejected[cid] = f"rejected update: {err}"
            except Exception as err:  # anything else a crafted payload provokes is still that client's fault
                rejected[cid] = f"rejected update: {type(err).__name__}: {err}"
        return updates, rejected

    def lora_round(
        self, round_index: int, state: dict[str, np.ndarray], rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], RoundRecord]:
        """One FedAvg round of the adapters, configured and aggregated by the run's Λ strategy.

        The plan's upload instructions (masking, weighting) are not sent: LoRA clients always
        upload in the clear (secure aggregation is refused above), so the payload stays as it was.
        """
        started, s = time.monotonic(), self.settings
        strategy = self.strategies.coefficients
        at = RoundId("train", round_index, f"round {round_index}")
        plan = strategy.configure(self.alive, rng)
        config = dataclasses.replace(s.calibration, epochs=s.local_epochs, lr=self.lora.lr)
        request = wire.encode(
            state,
            round=round_index,
            seed=s.seed + round_index,
            config=dataclasses.asdict(config),
            lora=dataclasses.asdict(self.lora),
        )
        asked = self.pool.call(at.stage, at.index, "train_lora", plan.requests(request))
        updates, rejected = self._decode_states(asked.answers, state)
        result = strategy.aggregate(at, updates, reference=flatten(state))
        outcome = RoundOutcome.collect(
            round_index, plan.clients, result.used, started,
            dropped=[asked.dropped, rejected, result.dropped], traffic=[asked.traffic, result.traffic],
        )  # fmt: skip
        return unflatten(result.value, state), outcome.record()

    def _evaluate(self, vectors, coefficients) -> dict:
        """Zero-shot and FedAvg-LoRA accuracy on the source's test split (the final global adapters)."""
        from ifedicl.federation_job.client import accuracy
        from ifedicl.model_patches.hf import HFContextModel

        test = self.population.server_test
        if not len(test) or not self.states:
            return {}
        model = self._base_model()
        ctx = HFContextModel(model)
        try:
            task = self.task
            zero_shot = accuracy(ctx, self.tokenizer, task, test)
            peft_model = attach_lora(model, self.lora)
            load_trainable(peft_model, self.states[-1])
            return {
                "dtype": self.settings.dtype,
                "test_examples": len(test),
                "zero_shot_accuracy": zero_shot,
                "accuracy": accuracy(ctx, self.tokenizer, task, test),
            }
        finally:
            ctx.remove_hooks()

    def run(self, publish: bool = False):
        if publish:
            raise IfediclError("a FedAvg-LoRA run has no context vectors to publish")
        return super().run(publish=False)
