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
from serving.quality import accuracy, held_out_split, run_dtype
from serving.tasks import ActiveTask, NoFreeSlotError, TaskQuality, TaskTable
from storage.store import Store, StoredRun

logger = logging.getLogger("ifedicl.serving")

# Texts one request may carry: each is one engine request, all admitted at once, so an
# unbounded list would let one client queue arbitrary work ahead of everyone else.
DEFAULT_MAX_INPUTS = 256


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
    task: str = ""  # the task it was scored under
    run_id: str | None = None  # that task's version (None: the plain model)
    similarity: float | None = None  # model="auto": cosine similarity to the chosen task's signature

    @property
    def probs(self) -> list[float]:
        """Probabilities in the task's label order (vLLM's ``probs``)."""
        return list(self.probabilities.values())


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
        max_inputs: int = DEFAULT_MAX_INPUTS,
    ):
        self.engine = engine
        self.max_inputs = max_inputs
        self.model_id = canonical_model_id(model)
        self.fingerprint = fingerprint(self.model_id, load_config(model))
        self.tokenizer = load_tokenizer(model)
        self.max_model_len = int(engine.model_config.max_model_len)
        self.dtype = str(engine.model_config.dtype).removeprefix("torch.")  # what the engine computes in
        self.store = Store(store)  # raises StoreError when the store does not exist
        self.table = TaskTable(max_slots)
        self.probe_slot = max_slots + 1
        self.metrics_registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServingMetrics(self.metrics_registry, self._active_runs, self._qualities)
        self._reload_lock = asyncio.Lock()
        # (task, run_id) -> why it was refused. Complete runs never change, so a refused
        # run is not retried (nor re-counted) at every poll while it stays published.
        self._refused: dict[tuple[str, str], str] = {}
        self.router = None  # serving.routing.TaskRouter when model="auto" is on

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

    def _qualities(self) -> Iterable[tuple[str, str, TaskQuality]]:
        return [(t.name, t.run_id, t.quality) for t in self.table.live.values() if t.quality is not None]

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
            if self.router is not None and (initial or report.activated or report.removed):
                served = [(t.name, t.run_id, t.vectors) for t in self.table.live.values()]
                await asyncio.to_thread(self.router.rebuild, served)
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
            active = ActiveTask(run.task, run.run_id, slot, label_ids, run.created_at, run.round, vectors=run.vectors)
            active.quality = await self._quality(run, active)
        except BaseException:
            self.table.release_slot(slot)
            raise
        return active

    async def _quality(self, run: StoredRun, task: ActiveTask) -> TaskQuality:
        """The run's accuracy in the serving dtype: its own, or its held-out split re-scored here.

        Scored through this engine under the row just written (not yet live), so the
        number is exactly what clients of this server get.
        """
        made_in = run_dtype(run.summary, run.settings)
        recorded = run.summary.get("accuracy")
        recorded = float(recorded) if isinstance(recorded, int | float) and np.isfinite(recorded) else None
        examples = run.summary.get("test_examples")
        if made_in == self.dtype:
            return TaskQuality(made_in, self.dtype, recorded, recorded, examples, "served in the run's own dtype")
        try:
            test = await asyncio.to_thread(held_out_split, run)
        except Exception as err:
            note = f"not re-scored in {self.dtype}: held-out split unavailable ({type(err).__name__}: {err})"
            logger.warning("ifedicl: task %s run %s (%s): %s", run.task.name, run.run_id, made_in, note)
            return TaskQuality(made_in, self.dtype, recorded, None, None, note)
        limit = self.max_model_len - 1
        encoded = [self.tokenizer(run.task.prompt(text))["input_ids"][-limit:] for text in test.texts]
        scores = await self._score_all(run.task, task.label_ids, test.texts, encoded, task.slot, task.cache_salt)
        served = accuracy([s.label for s in scores], test.labels, run.task.labels)
        note = f"held-out split re-scored in {self.dtype} at load (run made in {made_in})"
        logger.info(
            "ifedicl: task %s run %s: accuracy %s in %s (as made), %.4f in %s (served) on %d held-out texts",
            run.task.name, run.run_id, recorded, made_in, served, self.dtype, len(test),
        )  # fmt: skip
        return TaskQuality(made_in, self.dtype, recorded, served, len(test), note)

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

    def check_inputs(self, texts: Sequence[str], param: str = "input") -> None:
        """400 unless ``texts`` is a non-empty list of non-blank strings, at most ``max_inputs`` long."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise bad_request(f"'{param}' must be a non-empty string or a non-empty list of strings", param)
        if len(texts) > self.max_inputs:
            raise bad_request(
                f"'{param}' has {len(texts)} inputs; this server accepts at most {self.max_inputs} per request "
                "(--max-inputs-per-request): split the batch",
                param,
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise bad_request(f"'{param}'[{i}] is empty: nothing to classify", param)

    def encode(
        self, spec: TaskSpec, texts: Sequence[str], param: str = "input", truncate: int | None = None
    ) -> list[list[int]]:
        """Token ids of each text's prompt, as the reference path tokenizes it; 400 on bad input.

        ``truncate`` (vLLM's ``truncate_prompt_tokens``; -1 = the model's limit) keeps the
        prompt's *last* tokens: the label is scored right after the template's tail, so the
        head of the text is what can go.
        """
        self.check_inputs(texts, param)
        limit = self.max_model_len - 1  # the scored token needs one position
        if truncate is not None:
            if truncate == -1:
                truncate = limit
            if not 1 <= truncate <= limit:
                raise bad_request(
                    f"'truncate_prompt_tokens' must be -1 or in 1..{limit} (this model's maximum context length "
                    f"{self.max_model_len} minus the scored token), got {truncate}",
                    "truncate_prompt_tokens",
                )
        encoded = []
        for i, text in enumerate(texts):
            ids = self.tokenizer(spec.prompt(text))["input_ids"]
            if truncate is not None:
                ids = ids[-truncate:]
            if len(ids) + 1 > self.max_model_len:
                raise bad_request(
                    f"'{param}'[{i}]: the prompt has {len(ids)} tokens; this model's maximum context length is "
                    f"{self.max_model_len} tokens including the scored one",
                    param,
                )
            encoded.append(ids)
        return encoded

    async def classify(
        self,
        name: str,
        texts: Sequence[str],
        param: str = "input",
        *,
        priority: int = 0,
        truncate: int | None = None,
    ) -> Classification:
        """Classify ``texts`` under task ``name``'s live version (all of them under that one version).

        ``priority`` goes to the engine with every text (it matters under
        ``--scheduling-policy priority``; lower is earlier).
        """
        task = self.task(name)
        encoded = self.encode(task.spec, texts, param, truncate)
        start = time.perf_counter()
        with self.table.lease(task):
            scores = await self._score_all(
                task.spec, task.label_ids, texts, encoded, task.slot, task.cache_salt, priority
            )
        self.metrics.latency.labels(task.name).observe(time.perf_counter() - start)
        for score in scores:
            score.task, score.run_id = task.name, task.run_id
            self.metrics.predictions.labels(task.name, score.label).inc()
        return Classification(task.name, task.run_id, scores)

    async def classify_auto(
        self,
        texts: Sequence[str],
        param: str = "input",
        *,
        priority: int = 0,
        truncate: int | None = None,
    ) -> Classification:
        """model="auto": route each text to its nearest served task, classify it there.

        Texts routed to the same task are classified together (one version each); the
        answer keeps the request's order and says, per text, the task and similarity.
        """
        if self.router is None:
            raise not_found("model='auto' is off on this server (start it with --auto-route)")
        self.check_inputs(texts, param)
        if not self.table.live:
            raise ApiError(503, "no task is served: nothing to route to")
        start = time.perf_counter()
        routes = await asyncio.to_thread(self.router.route, list(texts))
        self.metrics.routing_latency.observe(time.perf_counter() - start)
        groups: dict[str, list[int]] = {}
        for i, route in enumerate(routes):
            groups.setdefault(route.task, []).append(i)
        results = await asyncio.gather(*(
            self.classify(task, [texts[i] for i in rows], param, priority=priority, truncate=truncate)
            for task, rows in groups.items()
        ))  # fmt: skip
        scores: list[Score | None] = [None] * len(texts)
        for rows, result in zip(groups.values(), results):
            for i, score in zip(rows, result.scores):
                score.similarity = routes[i].similarity
                scores[i] = score
                self.metrics.routed.labels(score.task).inc()
        run_ids = {s.run_id for s in scores}
        return Classification("auto", run_ids.pop() if len(run_ids) == 1 else None, scores)

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
        priority: int = 0,
    ) -> list[Score]:
        logprobs = await asyncio.gather(
            *(self._label_logprobs(ids, slot, salt, label_ids, priority) for ids in encoded)
        )
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

    async def _label_logprobs(
        self, ids: list[int], slot: int, salt: str | None, label_ids: list[int], priority: int = 0
    ) -> np.ndarray:
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
        request_id = f"ifedicl-{uuid.uuid4().hex}"
        async for output in self.engine.generate(prompt, params, request_id, priority=priority):
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
