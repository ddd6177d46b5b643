"""Classification over a running vLLM engine with per-request task injection.

:class:`ClassificationService` owns what the HTTP layer needs and nothing HTTP:
the live task versions (loaded from the store, written into the engine's
injection tables), label scoring, hot reload, metrics and the start-up check
that injection is really live. It talks to any vLLM ``EngineClient`` (the API
server's AsyncLLM, or one built in a test), so the equivalence tests exercise
exactly the code the server runs.

Scoring one text: prompt ``task.prompt(text)``, tokenized with the model's HF
tokenizer exactly as the reference path does; one engine request with
``max_tokens=1``, ``logprob_token_ids`` = the label words' first tokens,
``extra_args={"task_id": row}`` and ``cache_salt`` per (task, version); then a
softmax over those label logprobs (= softmax over the label logits).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from federation_job.modeling import canonical_model_id, fingerprint, load_config, load_tokenizer
from federation_job.task import TaskSpec, label_token_ids
from model_patches.injection import InjectionTables
from model_patches.vllm_plugin import DEFAULT_MAX_SLOTS
from model_patches.vllm_runner import TASK_ID_KEY
from model_patches.vllm_worker import pack_tables
from serving.errors import ApiError, bad_request, not_found
from serving.metrics import ServingMetrics
from serving.tasks import ActiveTask, NoFreeSlotError, TaskTable
from storage.store import Store, StoredRun

logger = logging.getLogger("ifedicl.serving")


class InjectionInactiveError(RuntimeError):
    """The engine runs, but per-request injection does not reach the model."""


@dataclass
class Score:
    """One classified text."""

    text: str
    label: str
    probabilities: dict[str, float]  # softmax over the label words' first-token logits
    logprobs: dict[str, float]  # log of the above (normalized over the labels)
    prompt_tokens: int


@dataclass
class Classification:
    task: str
    run_id: str | None  # None: scored on the plain model
    scores: list[Score]

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.scores)


@dataclass
class ReloadReport:
    activated: dict[str, str] = field(default_factory=dict)  # task -> run made live
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # task (or "_store") -> reason
    live: dict[str, str] = field(default_factory=dict)  # task -> run live after the reload

    def to_dict(self) -> dict:
        return {"activated": self.activated, "removed": self.removed, "failed": self.failed, "live": self.live}


class ClassificationService:
    """Live tasks, scoring and hot reload over one engine."""

    def __init__(
        self,
        engine,  # vllm.engine.protocol.EngineClient started with engine_overrides(...)
        model: str,
        store: str,
        *,
        max_slots: int = DEFAULT_MAX_SLOTS,
        registry: CollectorRegistry | None = None,
    ):
        self.engine = engine
        self.model_id = canonical_model_id(model)
        self.fingerprint = fingerprint(self.model_id, load_config(model))
        self.tokenizer = load_tokenizer(model)
        self.max_model_len = int(engine.model_config.max_model_len)
        self.store = Store(store)  # raises StoreError when the store does not exist
        self.table = TaskTable(max_slots)
        self.probe_slot = max_slots + 1
        self.metrics_registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServingMetrics(self.metrics_registry, self._active_runs)
        self._reload_lock = asyncio.Lock()
        # (task, run_id) -> why it was refused. Complete runs never change, so a refused
        # run is not retried (nor re-counted) at every poll while it stays published.
        self._refused: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ start-up
    async def start(self) -> ReloadReport:
        """Check that injection is live, then load every published task."""
        await self.check_injection_live()
        return await self.reload(initial=True)

    async def _engine_info(self) -> list[dict]:
        return list(await self.engine.collective_rpc("ifedicl_info"))

    async def check_injection_live(self) -> None:
        """Fail loudly if per-request injection would silently do nothing.

        The known failure of earlier steering attempts is a model runner that
        skips the hook: everything runs, nothing is injected. Here the same
        prompt is scored plain and under the probe row (β = 0, which zeroes every
        block output); the two must differ, and the workers must have seen the
        probe row's tokens through the seam.
        """
        infos = await self._engine_info()
        for info in infos:
            if not info["seam_installed"]:
                raise InjectionInactiveError("the runner seam is not installed in a worker")
            if info["probe_slot"] != self.probe_slot:
                raise InjectionInactiveError(
                    f"engine has {info['max_slots']} slots, the service expects {self.probe_slot - 1}"
                )
        before = sum(info["tokens_injected"] for info in infos)
        ids = self.tokenizer("ifedicl liveness probe")["input_ids"] or [self.tokenizer.eos_token_id]
        probe_ids = list(range(min(8, len(self.tokenizer))))
        plain, probed = await asyncio.gather(
            self._label_logprobs(ids, 0, "ifedicl/probe/plain", probe_ids),
            self._label_logprobs(ids, self.probe_slot, "ifedicl/probe/zero", probe_ids),
        )
        after = sum(info["tokens_injected"] for info in await self._engine_info())
        if after - before < len(ids):
            raise InjectionInactiveError(
                f"the runner seam saw {after - before} injected tokens for a {len(ids)}-token probe: "
                "this vLLM model runner does not call the wrapped _prepare_inputs"
            )
        if np.max(np.abs(plain - probed)) < 1e-6:
            raise InjectionInactiveError("the probe row did not change the model's output: layers ignore token_task")
        logger.info("ifedicl: injection is live (probe changed label logprobs by %.3g)", np.max(np.abs(plain - probed)))

    # ------------------------------------------------------------------ reload
    def _active_runs(self) -> Iterable[tuple[str, str, datetime]]:
        return [(t.name, t.run_id, t.created_at) for t in self.table.live.values()]

    async def reload(self, initial: bool = False) -> ReloadReport:
        """Make the store's published runs live; refuse (and count) the ones that cannot be."""
        async with self._reload_lock:
            report = ReloadReport()
            try:
                published = await asyncio.to_thread(self.store.published)
            except Exception as err:  # the store is unreachable: keep serving what is live
                logger.error("ifedicl: cannot read the store %s: %s", self.store.uri, err)
                self.metrics.reload_failures.inc()
                report.failed["_store"] = str(err)
                report.live = {t.name: t.run_id for t in self.table.live.values()}
                return report
            for task, run_id in published.items():
                current = self.table.get(task)
                if current is not None and current.run_id == run_id:
                    continue
                if (task, run_id) in self._refused:
                    report.failed[task] = self._refused[(task, run_id)]
                    continue
                try:
                    run = await asyncio.to_thread(self.store.load_run, task, run_id, self.fingerprint)
                    active = await self._install(run)
                except Exception as err:
                    logger.error("ifedicl: refused run %s of task %s: %s", run_id, task, err)
                    self.metrics.reload_failures.inc()
                    report.failed[task] = f"run {run_id}: {type(err).__name__}: {err}"
                    if not isinstance(err, NoFreeSlotError):  # the only refusal that may pass later
                        self._refused[(task, run_id)] = report.failed[task]
                    continue
                self.table.activate(active)
                report.activated[task] = run_id
                if not initial:
                    self.metrics.reloads.inc()
                logger.info("ifedicl: task %s now serves run %s (slot %d)", task, run_id, active.slot)
            for task in set(self.table.live) - set(published):
                self.table.remove(task)
                report.removed.append(task)
            report.live = {t.name: t.run_id for t in self.table.live.values()}
            return report

    async def _install(self, run: StoredRun) -> ActiveTask:
        """Validate ``run``, write its tables into a free engine row, and describe it (not yet live)."""
        num_layers, hidden = self.fingerprint.num_layers, self.fingerprint.hidden_size
        if run.vectors.shape != (num_layers, 2, hidden) or run.coefficients.shape != (num_layers, 2, 2):
            raise ValueError(
                f"run {run.run_id} has vectors {run.vectors.shape} and coefficients {run.coefficients.shape}; "
                f"the model needs ({num_layers}, 2, {hidden}) and ({num_layers}, 2, 2)"
            )
        if not (np.isfinite(run.vectors).all() and np.isfinite(run.coefficients).all()):
            raise ValueError(f"run {run.run_id} contains NaN or inf")
        label_ids = label_token_ids(run.task, self.tokenizer)
        tables = InjectionTables.build([torch.from_numpy(run.vectors)], [torch.from_numpy(run.coefficients)])
        slot = self.table.reserve_slot()
        try:
            beta, shift = pack_tables(tables.beta[:, :, 1:], tables.shift[:, :, 1:])  # row 1 = this run
            await self.engine.collective_rpc("ifedicl_write_slots", args=([slot], beta, shift))
        except BaseException:
            self.table.release_slot(slot)
            raise
        return ActiveTask(run.task, run.run_id, slot, label_ids, run.created_at, run.round)

    async def poll_forever(self, interval: float) -> None:
        """Reload every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                report = await self.reload()
            except Exception:  # never let the poller die
                logger.exception("ifedicl: reload failed")
                self.metrics.reload_failures.inc()
                continue
            if report.activated or report.removed or report.failed:
                logger.info("ifedicl: reload %s", report.to_dict())

    # ------------------------------------------------------------------ scoring
    def task(self, name: str) -> ActiveTask:
        task = self.table.get(name)
        if task is None:
            raise not_found(f"The model `{name}` does not exist. Served tasks: {self.table.names()}")
        return task

    def encode(self, spec: TaskSpec, texts: Sequence[str], param: str = "input") -> list[list[int]]:
        """Token ids of each text's prompt, as the reference path tokenizes it; 400 on bad input."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise bad_request(f"'{param}' must be a non-empty string or a non-empty list of strings", param)
        encoded = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise bad_request(f"'{param}'[{i}] is empty: nothing to classify", param)
            ids = self.tokenizer(spec.prompt(text))["input_ids"]
            if len(ids) + 1 > self.max_model_len:
                raise bad_request(
                    f"'{param}'[{i}]: the prompt has {len(ids)} tokens; this model's maximum context length is "
                    f"{self.max_model_len} tokens including the scored one",
                    param,
                )
            encoded.append(ids)
        return encoded

    async def classify(self, name: str, texts: Sequence[str], param: str = "input") -> Classification:
        """Classify ``texts`` under task ``name``'s live version (all of them under that one version)."""
        task = self.task(name)
        encoded = self.encode(task.spec, texts, param)
        start = time.perf_counter()
        with self.table.lease(task):
            scores = await self._score_all(task.spec, task.label_ids, texts, encoded, task.slot, task.cache_salt)
        self.metrics.latency.labels(task.name).observe(time.perf_counter() - start)
        for score in scores:
            self.metrics.predictions.labels(task.name, score.label).inc()
        return Classification(task.name, task.run_id, scores)

    async def classify_plain(self, spec: TaskSpec, texts: Sequence[str]) -> Classification:
        """Score ``spec``'s label words on the plain model (row 0; the reference's ``run=None``)."""
        label_ids = label_token_ids(spec, self.tokenizer)
        encoded = self.encode(spec, texts)
        scores = await self._score_all(spec, label_ids, texts, encoded, 0, None)
        return Classification(spec.name, None, scores)

    async def _score_all(
        self,
        spec: TaskSpec,
        label_ids: list[int],
        texts: Sequence[str],
        encoded: list[list[int]],
        slot: int,
        salt: str | None,
    ) -> list[Score]:
        logprobs = await asyncio.gather(*(self._label_logprobs(ids, slot, salt, label_ids) for ids in encoded))
        scores = []
        for text, ids, row in zip(texts, encoded, logprobs):
            probs = _softmax(row)
            scores.append(
                Score(
                    text=text,
                    label=spec.labels[int(np.argmax(probs))],
                    probabilities={w: float(p) for w, p in zip(spec.labels, probs)},
                    logprobs={w: float(v) for w, v in zip(spec.labels, row - _logsumexp(row))},
                    prompt_tokens=len(ids),
                )
            )
        return scores

    async def _label_logprobs(self, ids: list[int], slot: int, salt: str | None, label_ids: list[int]) -> np.ndarray:
        """One engine request: the logprobs of ``label_ids`` as the next token after ``ids``. [C] float64."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(ids))
        if salt is not None:
            prompt["cache_salt"] = salt
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprob_token_ids=list(label_ids),
            extra_args={TASK_ID_KEY: int(slot)},
            detokenize=False,
        )
        final = None
        async for output in self.engine.generate(prompt, params, f"ifedicl-{uuid.uuid4().hex}"):
            final = output
        if final is None or not final.outputs or not final.outputs[0].logprobs:
            raise ApiError(500, "the engine returned no logprobs")
        step = final.outputs[0].logprobs[0]  # {token_id: Logprob}
        return np.array([step[i].logprob for i in label_ids], dtype=np.float64)


def _logsumexp(row: np.ndarray) -> float:
    top = float(np.max(row))
    return top + float(np.log(np.sum(np.exp(row - top))))


def _softmax(row: np.ndarray) -> np.ndarray:
    return np.exp(row - _logsumexp(row))
