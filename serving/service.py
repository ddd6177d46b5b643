"""Classification over a running vLLM engine with per-request task injection.

:class:`ClassificationService` owns what the HTTP layer needs and nothing HTTP:
the published task versions (a catalog read from the store at each reload),
label scoring, hot reload, metrics and the start-up check that injection is really
live. The engine's injection tables are a bounded cache of the catalog's versions,
:class:`~ifedicl.serving.task_cache.TaskCache` (loaded on first request, least
recently used unleased version evicted); a version's accuracy as served is
:func:`~ifedicl.serving.quality.served_quality`. What it refuses it raises as
:mod:`~ifedicl.serving.domain_errors`; only :mod:`ifedicl.serving.api` speaks HTTP.
It talks to any vLLM ``EngineClient`` (the API server's AsyncLLM, or one built in a
test), so the equivalence tests exercise exactly the code the server runs.

Scoring one text: prompt ``task.prompt(text)``, tokenized with the model's HF
tokenizer exactly as the reference path does; one engine request with
``max_tokens=1``, ``logprob_token_ids`` = the label words' first tokens,
``extra_args={"task_row": task_row}`` and ``cache_salt`` per (task, version); then a
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
from prometheus_client import CollectorRegistry

from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_config, load_tokenizer
from ifedicl.kernel.task import TaskSpec, label_token_ids
from ifedicl.model_patches.vllm_plugin import DEFAULT_MAX_SLOTS
from ifedicl.model_patches.vllm_runner import TASK_ROW_KEY
from ifedicl.serving.domain_errors import BadRequest, InternalError, TaskNotFound, TaskUnavailable
from ifedicl.serving.metrics import ServingMetrics
from ifedicl.serving.quality import TaskQuality, served_quality
from ifedicl.serving.task_cache import (
    DEFAULT_LOAD_ATTEMPTS,
    DEFAULT_LOAD_BACKOFF_S,
    DEFAULT_SLOT_WAIT_SECONDS,
    ActiveTask,
    TaskCache,
    TaskTable,
    failure_reason,
)
from ifedicl.storage.store import RunInfo, Store, StoredRun

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
    live: dict[str, str] = field(default_factory=dict)  # task -> run served after the reload (resident or not)

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
        slot_wait_seconds: float = DEFAULT_SLOT_WAIT_SECONDS,
        load_attempts: int = DEFAULT_LOAD_ATTEMPTS,
        load_backoff_s: float = DEFAULT_LOAD_BACKOFF_S,
    ):
        self.engine = engine
        self.max_inputs = max_inputs
        self.model_id = canonical_model_id(model)
        self.fingerprint = fingerprint(self.model_id, load_config(model))
        self.tokenizer = load_tokenizer(model)
        self.max_model_len = int(engine.model_config.max_model_len)
        self.dtype = str(engine.model_config.dtype).removeprefix("torch.")  # what the engine computes in
        self.store = Store(store)  # raises StoreError when the store does not exist
        self.probe_row = max_slots + 1  # the engine's last task row: β = 0 (see check_injection_live)
        self.catalog: dict[str, RunInfo] = {}  # task -> the published run it serves (tables resident or not)
        self.metrics_registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServingMetrics(
            self.metrics_registry,
            self._active_runs,
            self._served_qualities,
            resident=self._resident_count,
            slots=max_slots,
        )
        self.tasks = TaskCache(
            store=self.store,
            tokenizer=self.tokenizer,
            model=self.fingerprint,
            write_rows=self._write_rows,
            measure=self._measure,
            adopt=self._adopt,
            metrics=self.metrics,
            max_slots=max_slots,
            slot_wait_seconds=slot_wait_seconds,
            load_attempts=load_attempts,
            load_backoff_s=load_backoff_s,
        )
        self._reload_lock = asyncio.Lock()
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
            if info["probe_row"] != self.probe_row:
                raise InjectionInactiveError(
                    f"engine has {info['max_slots']} slots, the service expects {self.probe_row - 1}"
                )
        before = sum(info["tokens_injected"] for info in infos)
        ids = self.tokenizer("ifedicl liveness probe")["input_ids"] or [self.tokenizer.eos_token_id]
        probe_ids = list(range(min(8, len(self.tokenizer))))
        plain, probed = await asyncio.gather(
            self._label_logprobs(ids, 0, "ifedicl/probe/plain", probe_ids),
            self._label_logprobs(ids, self.probe_row, "ifedicl/probe/zero", probe_ids),
        )
        after = sum(info["tokens_injected"] for info in await self._engine_info())
        if after - before < len(ids):
            raise InjectionInactiveError(
                f"the runner seam saw {after - before} injected tokens for a {len(ids)}-token probe: "
                "this vLLM model runner does not call the wrapped _prepare_inputs"
            )
        if np.max(np.abs(plain - probed)) < 1e-6:
            raise InjectionInactiveError("the probe row did not change the output: layers ignore token_task_row")
        logger.info("ifedicl: injection is live (probe changed label logprobs by %.3g)", np.max(np.abs(plain - probed)))

    # ------------------------------------------------------------------ reload
    def _active_runs(self) -> Iterable[tuple[str, str, datetime]]:
        return [(t, info.run_id, info.created_at) for t, info in self.catalog.items()]

    def _served_qualities(self) -> Iterable[tuple[str, str, TaskQuality]]:
        return [(t, info.run_id, q) for t, info in self.catalog.items() if (q := self.quality(info)) is not None]

    def quality(self, info: RunInfo) -> TaskQuality | None:
        """What is known of ``info``'s accuracy as served (None until it was first loaded)."""
        return self.tasks.quality(info)

    def _resident_count(self) -> int:
        """Task versions in the engine now (0 while the service is built: a registry that auto-describes,
        as vLLM's does, collects a collector when it is registered, before the task cache exists)."""
        return len(self.tasks.table.resident) if hasattr(self, "tasks") else 0

    @property
    def table(self) -> TaskTable:
        """The engine's rows: which versions are resident (``bench/many_tasks.py`` reads it)."""
        return self.tasks.table

    async def reload(self, initial: bool = False) -> ReloadReport:
        """Serve the store's published runs; refuse (and count) the ones that cannot be.

        A newly published version replaces a resident one right away (loaded here,
        so the task stays warm) and fills a free row if there is one; otherwise it
        loads on its task's first request. Nothing is evicted by a reload.
        """
        async with self._reload_lock:
            report = ReloadReport()
            try:
                published = await asyncio.to_thread(self._published_runs)
            except Exception as err:  # the store is unreachable: keep serving what is live
                logger.error("ifedicl: cannot read the store %s: %s", self.store.uri, err)
                self.metrics.store_up.set(0)
                self.metrics.reload_failures.inc()
                report.failed["_store"] = str(err)
                report.live = {t: info.run_id for t, info in self.catalog.items()}
                return report
            self.metrics.store_up.set(1)
            for task, info in published.items():
                current = self.catalog.get(task)
                if current is not None and current.run_id == info.run_id:
                    continue
                refused = self.tasks.refusal(info)
                if refused is not None:
                    report.failed[task] = refused
                    continue
                try:
                    await self.tasks.warm(info)  # resident or a row free: loaded now, its accuracy known
                except Exception as err:
                    logger.error("ifedicl: refused run %s of task %s: %s", info.run_id, task, err)
                    self.metrics.reload_failures.inc()
                    report.failed[task] = failure_reason(info, err)
                    continue
                self.catalog[task] = info
                report.activated[task] = info.run_id
                if not initial:
                    self.metrics.reloads.inc()
                logger.info("ifedicl: task %s now serves run %s", task, info.run_id)
            for task in set(self.catalog) - set(published):
                del self.catalog[task]
                self.tasks.remove(task)
                report.removed.append(task)
            report.live = {t: info.run_id for t, info in self.catalog.items()}
            if self.router is not None and (initial or report.activated or report.removed):
                await asyncio.to_thread(self._rebuild_router)
            return report

    def _published_runs(self) -> dict[str, RunInfo]:
        """The store's published runs; :class:`StoreError` if the store itself is gone.

        The store is opened afresh (a cheap connect) because LanceDB lists a local store
        whose directory vanished as an empty database: read through the old connection,
        that would mean "nothing is published" and the reload would unload every task.
        """
        store = Store(self.store.uri)
        published = store.published_runs()
        store.require_present()  # moved away during the read: the empty listing is not the store's state
        return published

    def _rebuild_router(self) -> None:
        """model="auto": route over every published task's signature, read from the store in one query."""
        infos = list(self.catalog.values())
        fp = self.fingerprint
        vectors = self.store.vectors_of([i.run_id for i in infos], fp.num_layers, fp.hidden_size)
        self.router.rebuild([(i.task.name, i.run_id, vectors[i.run_id]) for i in infos])

    # ------------------------------------------------------------------ what the task cache asks
    def _adopt(self, info: RunInfo, reason: str) -> bool:
        """Whether a version the cache just made resident is the one ``info.task`` now serves (see
        :data:`~ifedicl.serving.task_cache.Adopt`): a reload's always, and it is published in that step;
        a request's unless a reload replaced or removed it while it loaded."""
        current = self.catalog.get(info.task.name)
        if reason == "request" and (current is None or current.run_id != info.run_id):
            return False
        self.catalog[info.task.name] = info
        return True

    async def _write_rows(self, rows: list[int], beta: bytes, shift: bytes) -> None:
        """Write packed task rows (``pack_tables``: [L, 2, R] and [L, 2, R, d] float32) into every worker."""
        await self.engine.collective_rpc("ifedicl_write_rows", args=(rows, beta, shift))

    async def _measure(self, run: StoredRun, task: ActiveTask) -> TaskQuality:
        """``run``'s accuracy as served: scored through this engine under the version's own row."""

        async def predict(texts: Sequence[str]) -> list[str]:
            limit = self.max_model_len - 1
            encoded = [self.tokenizer(run.task.prompt(text))["input_ids"][-limit:] for text in texts]
            scores = await self._score_all(run.task, task.label_ids, texts, encoded, task.task_row, task.cache_salt)
            return [s.label for s in scores]

        return await served_quality(run, self.dtype, predict)

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
    def spec(self, name: str) -> TaskSpec:
        """The served task ``name`` (:class:`TaskNotFound` if no run of it is published and accepted)."""
        return self._published(name).task

    def _published(self, name: str) -> RunInfo:
        info = self.catalog.get(name)
        if info is None:
            raise TaskNotFound(f"The model `{name}` does not exist. Served tasks: {sorted(self.catalog)}")
        return info

    def check_inputs(self, texts: Sequence[str], param: str = "input") -> None:
        """:class:`BadRequest` unless ``texts`` is a non-empty list of non-blank strings, at most ``max_inputs``."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise BadRequest(f"'{param}' must be a non-empty string or a non-empty list of strings", param)
        if len(texts) > self.max_inputs:
            raise BadRequest(
                f"'{param}' has {len(texts)} inputs; this server accepts at most {self.max_inputs} per request "
                "(--max-inputs-per-request): split the batch",
                param,
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise BadRequest(f"'{param}'[{i}] is empty: nothing to classify", param)

    def encode(
        self, spec: TaskSpec, texts: Sequence[str], param: str = "input", truncate: int | None = None
    ) -> list[list[int]]:
        """Token ids of each text's prompt, as the reference path tokenizes it; :class:`BadRequest` on bad input.

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
                raise BadRequest(
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
                raise BadRequest(
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
        spec = self.spec(name)
        encoded = self.encode(spec, texts, param, truncate)  # bad input fails before any load
        start = time.perf_counter()
        task = await self.tasks.lease(self._published(name))
        try:
            if task.spec != spec:  # a reload changed the template while this request waited
                encoded = self.encode(task.spec, texts, param, truncate)
            scores = await self._score_all(
                task.spec, task.label_ids, texts, encoded, task.task_row, task.cache_salt, priority
            )
        finally:
            self.tasks.release(task)
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
            raise TaskNotFound("model='auto' is off on this server (start it with --auto-route)")
        self.check_inputs(texts, param)
        if not self.catalog:
            raise TaskUnavailable("no task is served: nothing to route to")
        start = time.perf_counter()
        routes = await asyncio.to_thread(self.router.route, list(texts))
        self.metrics.routing_latency.observe(time.perf_counter() - start)
        groups: dict[str, list[int]] = {}
        for i, route in enumerate(routes):
            groups.setdefault(route.task, []).append(i)
        results = await asyncio.gather(*(
            self.classify(task, [texts[i] for i in positions], param, priority=priority, truncate=truncate)
            for task, positions in groups.items()
        ))  # fmt: skip
        scores: list[Score | None] = [None] * len(texts)
        for positions, result in zip(groups.values(), results):
            for i, score in zip(positions, result.scores):
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
        task_row: int,
        salt: str | None,
        priority: int = 0,
    ) -> list[Score]:
        logprobs = await asyncio.gather(
            *(self._label_logprobs(ids, task_row, salt, label_ids, priority) for ids in encoded)
        )
        scores = []
        for text, ids, label_logprobs in zip(texts, encoded, logprobs):
            probs = _softmax(label_logprobs)
            scores.append(
                Score(
                    text=text,
                    label=spec.labels[int(np.argmax(probs))],
                    probabilities={w: float(p) for w, p in zip(spec.labels, probs)},
                    logprobs={w: float(v) for w, v in zip(spec.labels, label_logprobs - _logsumexp(label_logprobs))},
                    prompt_tokens=len(ids),
                )
            )
        return scores

    async def _label_logprobs(
        self, ids: list[int], task_row: int, salt: str | None, label_ids: list[int], priority: int = 0
    ) -> np.ndarray:
        """One engine request under ``task_row``: the logprobs of ``label_ids`` after ``ids``. [C] float64."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(ids))
        if salt is not None:
            prompt["cache_salt"] = salt
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprob_token_ids=list(label_ids),
            extra_args={TASK_ROW_KEY: int(task_row)},
            detokenize=False,
        )
        final = None
        request_id = f"ifedicl-{uuid.uuid4().hex}"
        async for output in self.engine.generate(prompt, params, request_id, priority=priority):
            final = output
        if final is None or not final.outputs or not final.outputs[0].logprobs:
            raise InternalError("the engine returned no logprobs")
        step = final.outputs[0].logprobs[0]  # {token_id: Logprob}
        return np.array([step[i].logprob for i in label_ids], dtype=np.float64)


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + float(np.log(np.sum(np.exp(values - top))))


def _softmax(values: np.ndarray) -> np.ndarray:
    return np.exp(values - _logsumexp(values))
