"""Classification over a running vLLM engine with per-request task injection.

:class:`ClassificationService` owns what the HTTP layer needs and nothing HTTP:
the published task versions (a catalog read from the store at each reload),
the engine's injection tables as a bounded cache of them (a task's tables are
read from the store and written into a task row on its first request, evicting the
least recently used version no request holds), label scoring, hot reload,
metrics and the start-up check that injection is really live. It talks to any vLLM ``EngineClient`` (the API
server's AsyncLLM, or one built in a test), so the equivalence tests exercise
exactly the code the server runs.

Scoring one text: prompt ``task.prompt(text)``, tokenized with the model's HF
tokenizer exactly as the reference path does; one engine request with
``max_tokens=1``, ``logprob_token_ids`` = the label words' first tokens,
``extra_args={"task_row": task_row}`` and ``cache_salt`` per (task, version); then a
softmax over those label logprobs (= softmax over the label logits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_config, load_tokenizer
from ifedicl.kernel.task import TaskSpec, label_token_ids
from ifedicl.model_patches.injection import InjectionTables
from ifedicl.model_patches.vllm_plugin import DEFAULT_MAX_SLOTS
from ifedicl.model_patches.vllm_runner import TASK_ROW_KEY
from ifedicl.model_patches.vllm_worker import pack_tables
from ifedicl.serving.api_errors import ApiError, bad_request, not_found
from ifedicl.serving.metrics import ServingMetrics
from ifedicl.serving.quality import accuracy, held_out_split, run_dtype
from ifedicl.serving.task_cache import ActiveTask, NoFreeRowError, TaskQuality, TaskTable
from ifedicl.storage.store import RunInfo, Store, StoredRun, StoreError, StoreUnavailable, check_fingerprint

logger = logging.getLogger("ifedicl.serving")

# Texts one request may carry: each is one engine request, all admitted at once, so an
# unbounded list would let one client queue arbitrary work ahead of everyone else.
DEFAULT_MAX_INPUTS = 256

# How long a cache miss waits for a task row when every row is leased by in-flight requests (then 503).
# Long enough to ride out a burst of in-flight requests; ``--slot-wait-seconds`` changes it.
DEFAULT_SLOT_WAIT_SECONDS = 60.0


# A task load that fails transiently (the store's tables unreadable for a moment) is retried this many
# times in all, waiting DEFAULT_LOAD_BACKOFF_S, then twice that, ... between attempts (0.25 + 0.5 + 1 = 1.75 s):
# long enough to ride out a table being swapped or an object store's hiccup, short enough that the
# request waiting on it still gets its answer (or a 503) within seconds.
DEFAULT_LOAD_ATTEMPTS = 4
DEFAULT_LOAD_BACKOFF_S = 0.25


def permanent(err: BaseException) -> bool:
    """Whether a failed task load says something about the *run* (refuse it until it is replaced) or only
    about this moment (retry later, never cache it).

    Permanent: the run's own errors, which no retry changes: the run or its rows are gone or incomplete
    (:class:`StoreError`), it was made with another model (:class:`ModelMismatchError`), its label words
    do not fit this tokenizer, its tables hold NaN. Everything else is transient: the store's tables
    unreadable now (:class:`StoreUnavailable`), an IO error, the engine failing a row write.
    """
    return isinstance(err, IfediclError) and not isinstance(err, StoreUnavailable)


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
        self.load_attempts = max(1, load_attempts)
        self.load_backoff_s = load_backoff_s
        self.max_inputs = max_inputs
        self.slot_wait_seconds = slot_wait_seconds
        self.model_id = canonical_model_id(model)
        self.fingerprint = fingerprint(self.model_id, load_config(model))
        self.tokenizer = load_tokenizer(model)
        self.max_model_len = int(engine.model_config.max_model_len)
        self.dtype = str(engine.model_config.dtype).removeprefix("torch.")  # what the engine computes in
        self.store = Store(store)  # raises StoreError when the store does not exist
        self.table = TaskTable(max_slots, on_change=self._rows_may_be_free)
        self._rows_changed = asyncio.Event()
        self.probe_row = max_slots + 1  # the engine's last task row: β = 0 (see check_injection_live)
        self.catalog: dict[str, RunInfo] = {}  # task -> the published run it serves (tables resident or not)
        self._loading: dict[tuple[str, str], asyncio.Future[ActiveTask]] = {}  # (task, run) -> its load
        self._waiters: dict[tuple[str, str], int] = {}  # (task, run) -> requests waiting for that load
        self._qualities: dict[tuple[str, str], TaskQuality] = {}  # (task, run) -> accuracy as served
        self.metrics_registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServingMetrics(
            self.metrics_registry,
            self._active_runs,
            self._served_qualities,
            resident=lambda: len(self.table.resident),
            slots=max_slots,
        )
        self._reload_lock = asyncio.Lock()
        # (task, run_id) -> why it was refused. Complete runs never change, so a run refused for a
        # permanent reason (see permanent()) is not retried (nor re-counted) at every poll while it
        # stays published; a transient failure is never kept here.
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
        return self._qualities.get((info.task.name, info.run_id))

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
                if (task, info.run_id) in self._refused:
                    report.failed[task] = self._refused[(task, info.run_id)]
                    continue
                try:
                    self._check(info)
                    if task in self.table.resident or self.table.free_rows() > 0:
                        loaded = await self._load_once(info, reason="reload")
                        self.table.release(loaded)
                        if loaded.measuring is not None:
                            await loaded.measuring  # its accuracy is known before it is reported live
                except Exception as err:
                    logger.error("ifedicl: refused run %s of task %s: %s", info.run_id, task, err)
                    self.metrics.reload_failures.inc()
                    report.failed[task] = f"run {info.run_id}: {type(err).__name__}: {err}"
                    if permanent(err):  # a transient failure is tried again at the next poll or request
                        self._refused[(task, info.run_id)] = report.failed[task]
                    continue
                self.catalog[task] = info
                report.activated[task] = info.run_id
                if not initial:
                    self.metrics.reloads.inc()
                logger.info("ifedicl: task %s now serves run %s", task, info.run_id)
            for task in set(self.catalog) - set(published):
                del self.catalog[task]
                self.table.remove(task)
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
        return Store(self.store.uri).published_runs()

    def _rebuild_router(self) -> None:
        """model="auto": route over every published task's signature, read from the store in one query."""
        infos = list(self.catalog.values())
        fp = self.fingerprint
        vectors = self.store.vectors_of([i.run_id for i in infos], fp.num_layers, fp.hidden_size)
        self.router.rebuild([(i.task.name, i.run_id, vectors[i.run_id]) for i in infos])

    def _check(self, info: RunInfo) -> None:
        """What can be checked without the tables: the model it was made on, its label words."""
        check_fingerprint(info.run_id, info.fingerprint, self.fingerprint)
        label_token_ids(info.task, self.tokenizer)

    async def _resident(self, name: str) -> ActiveTask:
        """``name``'s published version with its tables in the engine, leased to the caller.

        A cache miss loads it now (one load however many requests ask at once).
        The caller gives the lease back with ``self.table.release``.
        """
        info = self.catalog.get(name)
        if info is None:
            raise not_found(f"The model `{name}` does not exist. Served tasks: {sorted(self.catalog)}")
        refused = self._refused.get((name, info.run_id))
        if refused is not None:
            raise ApiError(503, f"task {name}: its published run cannot be served: {refused}")
        task = self.table.get(name)
        if task is not None and task.run_id == info.run_id:
            self.table.hold(task)
            return task
        try:
            return await self._load_once(info, reason="request")
        except NoFreeRowError as err:
            raise ApiError(503, f"task {name}: {err} (waited {self.slot_wait_seconds:g} s for a free one)") from None
        except Exception as err:
            reason = f"run {info.run_id}: {type(err).__name__}: {err}"
            if permanent(err):  # the run itself cannot be served: refused until another run is published
                self._refused[(name, info.run_id)] = reason
                raise ApiError(503, f"task {name}: its published run cannot be served: {reason}") from None
            raise ApiError(
                503, f"task {name}: its tables are unavailable right now ({reason}); not refused, retry shortly"
            ) from None

    async def _load_once(self, info: RunInfo, reason: str) -> ActiveTask:
        """Load ``info`` unless a load of the same (task, version) is under way, then wait for it.

        Returns the version leased to this caller: the load takes one lease per
        waiter in the step that makes it resident, so no other load can evict it
        before its waiters have used it.
        """
        key = (info.task.name, info.run_id)
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(info, reason))
            self._loading[key] = pending
            self._waiters[key] = 0
        self._waiters[key] += 1
        try:
            return await asyncio.shield(pending)  # one waiter giving up does not cancel the others' load
        except asyncio.CancelledError:
            if pending.done() and not pending.cancelled() and pending.exception() is None:
                self.table.release(pending.result())  # its lease was taken: give it back
            elif key in self._waiters:
                self._waiters[key] -= 1
            raise

    async def _reserve_row(self) -> int:
        """A task row for a new version: free, or the least recently used one no request holds.

        When every row is leased, waits up to ``slot_wait_seconds`` for a lease to end, then
        raises :class:`NoFreeRowError` (503): a request never waits unboundedly on others.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.slot_wait_seconds
        while True:
            changed = self._rows_changed
            try:
                task_row, evicted = self.table.reserve_row()
            except NoFreeRowError:
                if loop.time() >= deadline:
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), deadline - loop.time())
                continue
            if evicted is not None:
                self.metrics.evictions.inc()
                logger.debug("ifedicl: evicted task %s run %s from row %d", evicted.name, evicted.run_id, task_row)
            return task_row

    def _rows_may_be_free(self) -> None:
        """Wake loads waiting for a row (a lease ended, a load failed, a version became resident)."""
        self._rows_changed.set()
        self._rows_changed = asyncio.Event()

    async def _load(self, info: RunInfo, reason: str) -> ActiveTask:
        """Read ``info``'s tables from the store, write them into a task row, make that version resident.

        Returns in the step that activates it, with one lease per waiter (see
        :meth:`_load_once`); a missing accuracy is measured in the background
        (``active.measuring``), so a cold request does not wait for a re-score.
        """
        key = (info.task.name, info.run_id)
        start = time.perf_counter()
        try:
            run = await self._read_tables(info)
            if not (np.isfinite(run.vectors).all() and np.isfinite(run.coefficients).all()):
                raise StoreError(f"run {run.run_id} contains NaN or inf")
            label_ids = label_token_ids(run.task, self.tokenizer)
            tables = InjectionTables.build([torch.from_numpy(run.vectors)], [torch.from_numpy(run.coefficients)])
            beta, shift = pack_tables(tables.beta[:, :, 1:], tables.shift[:, :, 1:])  # row 1 = this run
            task_row = await self._reserve_row()
            try:
                await self.engine.collective_rpc("ifedicl_write_rows", args=([task_row], beta, shift))
            except BaseException:
                self.table.release_row(task_row)
                raise
        except BaseException:
            self._loading.pop(key, None)
            self._waiters.pop(key, None)
            raise
        # From here to the return nothing awaits: the row, the catalog and the waiters' leases change together.
        self._loading.pop(key, None)
        active = ActiveTask(run.task, run.run_id, task_row, label_ids, run.created_at, run.round)
        active.leases = self._waiters.pop(key, 0)
        current = self.catalog.get(run.task.name)
        if reason == "request" and (current is None or current.run_id != run.run_id):
            self.table.retire(active)  # a reload replaced or removed it meanwhile: serve the waiters, then free
        else:
            self.table.activate(active)
            self.catalog[run.task.name] = info
        self.metrics.loads.labels(reason).inc()
        self.metrics.load_latency.observe(time.perf_counter() - start)
        active.quality = self._qualities.get(key)
        if active.quality is None:
            self.table.hold(active)
            active.measuring = asyncio.ensure_future(self._measure_quality(run, active))
        return active

    async def _read_tables(self, info: RunInfo) -> StoredRun:
        """``info``'s tables from the store, retrying a transient failure with exponential backoff.

        At most ``load_attempts`` reads, ``load_backoff_s`` x 1, 2, 4, ... apart; a permanent error
        (:func:`permanent`) is raised at once, the last transient one after the final attempt.
        """
        for attempt in range(self.load_attempts):
            try:
                return await asyncio.to_thread(self.store.load_tables, info)
            except Exception as err:
                if permanent(err) or attempt + 1 == self.load_attempts:
                    raise
                delay = self.load_backoff_s * 2**attempt
                logger.warning(
                    "ifedicl: run %s of task %s: load attempt %d/%d failed (%s: %s); retrying in %.2g s",
                    info.run_id, info.task.name, attempt + 1, self.load_attempts, type(err).__name__, err, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _measure_quality(self, run: StoredRun, task: ActiveTask) -> None:
        """Record the run's accuracy in the serving dtype (once per version; survives evictions).

        Called with a lease on ``task`` held for it, which it gives back.
        """
        try:
            quality = await self._quality(run, task)
        except Exception as err:  # a background measurement must not take the server down
            logger.error("ifedicl: task %s run %s: accuracy not measured: %s", run.task.name, run.run_id, err)
            return
        finally:
            self.table.release(task)
        self._qualities[(run.task.name, run.run_id)] = task.quality = quality

    async def _quality(self, run: StoredRun, task: ActiveTask) -> TaskQuality:
        """The run's accuracy in the serving dtype: its own, or its held-out split re-scored here.

        Scored through this engine under the version's own row, so the number is
        exactly what clients of this server get.
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
        scores = await self._score_all(run.task, task.label_ids, test.texts, encoded, task.task_row, task.cache_salt)
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
    def spec(self, name: str) -> TaskSpec:
        """The served task ``name`` (404 if no run of it is published and accepted)."""
        info = self.catalog.get(name)
        if info is None:
            raise not_found(f"The model `{name}` does not exist. Served tasks: {sorted(self.catalog)}")
        return info.task

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
        spec = self.spec(name)
        encoded = self.encode(spec, texts, param, truncate)  # bad input fails before any load
        start = time.perf_counter()
        task = await self._resident(name)
        try:
            if task.spec != spec:  # a reload changed the template while this request waited
                encoded = self.encode(task.spec, texts, param, truncate)
            scores = await self._score_all(
                task.spec, task.label_ids, texts, encoded, task.task_row, task.cache_salt, priority
            )
        finally:
            self.table.release(task)
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
        if not self.catalog:
            raise ApiError(503, "no task is served: nothing to route to")
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
            raise ApiError(500, "the engine returned no logprobs")
        step = final.outputs[0].logprobs[0]  # {token_id: Logprob}
        return np.array([step[i].logprob for i in label_ids], dtype=np.float64)


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + float(np.log(np.sum(np.exp(values - top))))


def _softmax(values: np.ndarray) -> np.ndarray:
    return np.exp(values - _logsumexp(values))
