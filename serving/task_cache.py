"""A task version's life in the engine's injection tables: a bounded cache over the published runs.

The engine holds ``max_slots`` task rows ("slots" = task rows, ``--max-slots``); the
store may publish many more tasks.
A version is written into a free row (or the row of the least recently used
version no request holds) and only then made resident, so requests already
running keep the row (and the version) they started with: a request is leased
its task version for its whole life and scored entirely under it. A replaced
version is retired; its row returns to the free pool once its last lease ends.
Everything here runs on the server's event loop, so it needs no locks.

Two layers: :class:`TaskTable` is the bookkeeping of rows and leases (no IO, no awaits);
:class:`TaskCache` is the whole lifecycle over it (resident check, one load for concurrent
askers, reserving a row, writing the tables into the engine, leases, eviction, refusing a run
that can never be served), behind the few calls the classification service makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.model_fingerprint import ModelFingerprint
from ifedicl.kernel.task import TaskSpec, label_token_ids
from ifedicl.model_patches.injection import InjectionTables
from ifedicl.model_patches.vllm_worker import pack_tables
from ifedicl.serving.domain_errors import RunRefused, TaskUnavailable
from ifedicl.serving.metrics import ServingMetrics
from ifedicl.serving.quality import TaskQuality
from ifedicl.storage.store import RunInfo, Store, StoredRun, StoreError, StoreUnavailable, check_fingerprint

logger = logging.getLogger("ifedicl.serving")

# A task load that fails transiently (the store's tables unreadable for a moment) is retried this many
# times in all, waiting DEFAULT_LOAD_BACKOFF_S, then twice that, ... between attempts (0.25 + 0.5 + 1 = 1.75 s):
# long enough to ride out a table being swapped or an object store's hiccup, short enough that the
# request waiting on it still gets its answer (or TaskUnavailable) within seconds.
DEFAULT_LOAD_ATTEMPTS = 4
DEFAULT_LOAD_BACKOFF_S = 0.25
# How long a cache miss waits for a task row when every row is leased by in-flight requests (then
# TaskUnavailable). Long enough to ride out a burst of in-flight requests; ``--slot-wait-seconds`` changes it.
DEFAULT_SLOT_WAIT_SECONDS = 60.0


def permanent(err: BaseException) -> bool:
    """Whether a failed task load says something about the *run* (refuse it until it is replaced) or only
    about this moment (retry later, never cache it).

    Permanent: the run's own errors, which no retry changes: the run or its rows are gone or incomplete
    (:class:`StoreError`), it was made with another model (:class:`ModelMismatchError`), its label words
    do not fit this tokenizer, its tables hold NaN. Everything else is transient: the store's tables
    unreadable now (:class:`StoreUnavailable`), an IO error, the engine failing a row write.
    """
    return isinstance(err, IfediclError) and not isinstance(err, StoreUnavailable)


def failure_reason(info: RunInfo, err: BaseException) -> str:
    """How a failed load of ``info`` is reported (a request's TaskUnavailable, a reload's ``failed`` entry)."""
    return f"run {info.run_id}: {type(err).__name__}: {err}"


class NoFreeRowError(RuntimeError):
    """Every engine task row holds a version that in-flight requests are using."""


@dataclass
class ActiveTask:
    """One resident version of a task: its spec, run, task row and label token ids."""

    spec: TaskSpec
    run_id: str
    task_row: int  # its row in the engine's injection tables, 1..max_slots
    label_ids: list[int]
    created_at: datetime
    round: int
    quality: TaskQuality | None = field(default=None, compare=False)
    leases: int = field(default=0, compare=False)
    retired: bool = field(default=False, compare=False)  # no longer the version new requests get
    released: bool = field(default=False, compare=False)  # its row went back to the pool: never score on it
    measuring: asyncio.Future | None = field(default=None, compare=False, repr=False)  # accuracy being measured

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cache_salt(self) -> str:
        """Prefix-cache salt: KV computed under one (task, version) never serves another."""
        return f"ifedicl/{self.spec.name}/{self.run_id}"


class TaskTable:
    """The engine's table rows as a bounded cache of task versions, least recently used first out.

    ``resident`` maps a task name to the version new requests get, ordered from
    least to most recently used. A row is handed out free if one is, else taken
    from the least recently used resident version that no request holds
    (:meth:`reserve_row` says which, so the caller can count the eviction). A
    replaced version is *retired*: it keeps its row until its last lease ends.
    """

    def __init__(self, max_slots: int, on_change: Callable[[], None] = lambda: None):
        self.max_slots = max_slots
        self._on_change = on_change  # called when a row may have become free or evictable
        self.resident: OrderedDict[str, ActiveTask] = OrderedDict()
        self._free = list(range(max_slots, 0, -1))  # pop() hands out 1, 2, ...
        self._retired: list[ActiveTask] = []

    def get(self, name: str) -> ActiveTask | None:
        """``name``'s resident version (now the most recently used), or None."""
        task = self.resident.get(name)
        if task is not None:
            self.resident.move_to_end(name)
        return task

    def names(self) -> list[str]:
        return sorted(self.resident)

    def reserve_row(self) -> tuple[int, ActiveTask | None]:
        """A task row for a new version, and the version evicted to free it (None: the row was free).

        Raises :class:`NoFreeRowError` when every row is leased by in-flight requests.
        """
        self._collect()
        if self._free:
            return self._free.pop(), None
        for name, task in self.resident.items():  # least recently used first
            if task.leases == 0:
                del self.resident[name]
                task.retired = task.released = True
                return task.task_row, task
        raise NoFreeRowError(
            f"all {self.max_slots} injection slots (task rows) are held by in-flight requests "
            f"({len(self.resident)} resident tasks, {len(self._retired)} retired versions); raise --max-slots"
        )

    def free_rows(self) -> int:
        """Rows a new version can take without evicting anything."""
        self._collect()
        return len(self._free)

    def release_row(self, task_row: int) -> None:
        """Give back a reserved row that was never activated (a failed load)."""
        self._free.append(task_row)
        self._on_change()

    def activate(self, task: ActiveTask) -> ActiveTask | None:
        """Make ``task`` the resident version of its name; return the version it replaced."""
        old = self.resident.pop(task.name, None)
        self.resident[task.name] = task
        if old is not None:
            self.retire(old)
        self._on_change()
        return old

    def remove(self, name: str) -> ActiveTask | None:
        old = self.resident.pop(name, None)
        if old is not None:
            self.retire(old)
        return old

    def retire(self, task: ActiveTask) -> None:
        """Take ``task`` out of service: no new request gets it; its row is freed once unleased."""
        task.retired = True
        self._retired.append(task)
        self._collect()

    def _collect(self) -> None:
        """Free the rows of retired versions that no request holds any more."""
        still = []
        for task in self._retired:
            if task.leases == 0:
                task.released = True
                self._free.append(task.task_row)
            else:
                still.append(task)
        self._retired = still

    def hold(self, task: ActiveTask) -> None:
        """Lease ``task``'s row to one request: it is neither evicted nor freed until :meth:`release`."""
        if task.released:
            raise RuntimeError(f"task {task.name} run {task.run_id}: its row {task.task_row} was already given back")
        task.leases += 1

    def release(self, task: ActiveTask) -> None:
        task.leases -= 1
        if task.leases == 0:
            if task.retired:
                self._collect()
            self._on_change()

    @contextmanager
    def lease(self, task: ActiveTask) -> Iterator[ActiveTask]:
        """Hold ``task``'s row for the duration of one request."""
        self.hold(task)
        try:
            yield task
        finally:
            self.release(task)


# Writes task rows into the engine: (rows, beta, shift), beta/shift as pack_tables packs them (float32 bytes of
# [L, 2, len(rows)] and [L, 2, len(rows), d]). The service's is the workers' ``ifedicl_write_rows`` RPC.
RowWriter = Callable[[list[int], bytes, bytes], Awaitable[object]]
# The accuracy of a version as served, measured with a lease on it held (serving.quality.served_quality).
Measure = Callable[[StoredRun, ActiveTask], Awaitable[TaskQuality]]
# Asked in the step a loaded version becomes resident (no await in between): True makes it the version new
# requests of its task get; False retires it at once (a reload replaced or removed it while it loaded), its
# waiters are still served on it. The service answers from its catalog, and publishes a reload's version here.
Adopt = Callable[[RunInfo, str], bool]


class TaskCache:
    """Task versions in the engine's rows, leased to the requests scored on them.

    Why one object: a version's way into the engine (is it resident? is a load of it under way? which row,
    evicting whom, or waiting for a lease to end? write it, then make it resident and lease it to every
    waiter in one step; a run that can never be served is refused once, a transient failure retried and
    never remembered) is one sequence of states with one invariant (a leased version keeps its row). Spread
    over the service it was tangled with the catalog, scoring and HTTP; here the service only asks:

    - :meth:`lease` a published version for one request (loading it on a miss), :meth:`release` it after;
    - :meth:`warm` a newly published version at reload, :meth:`remove` a task no longer published;
    - :meth:`refusal` why a run was refused, :meth:`quality` what its accuracy as served is,
      :meth:`is_resident`; ``table`` is the rows' bookkeeping, to read.

    Failures are :mod:`~ifedicl.serving.domain_errors`: :class:`RunRefused` (never servable here),
    :class:`TaskUnavailable` (not now: the store unreadable, every row leased).
    """

    def __init__(
        self,
        *,
        store: Store,
        tokenizer,  # the served model's HF tokenizer (label words -> token ids)
        model: ModelFingerprint,  # what a run must have been made with
        write_rows: RowWriter,
        measure: Measure,
        adopt: Adopt,
        metrics: ServingMetrics,
        max_slots: int,
        slot_wait_seconds: float = DEFAULT_SLOT_WAIT_SECONDS,
        load_attempts: int = DEFAULT_LOAD_ATTEMPTS,
        load_backoff_s: float = DEFAULT_LOAD_BACKOFF_S,
    ):
        self.store = store
        self.tokenizer = tokenizer
        self.model = model
        self._write_rows = write_rows
        self._measure = measure
        self._adopt = adopt
        self.metrics = metrics
        self.slot_wait_seconds = slot_wait_seconds
        self.load_attempts = max(1, load_attempts)
        self.load_backoff_s = load_backoff_s
        self.table = TaskTable(max_slots, on_change=self._rows_may_be_free)
        self._rows_changed = asyncio.Event()
        self._loading: dict[tuple[str, str], asyncio.Future[ActiveTask]] = {}  # (task, run) -> its load
        self._waiters: dict[tuple[str, str], int] = {}  # (task, run) -> requests waiting for that load
        self._qualities: dict[tuple[str, str], TaskQuality] = {}  # (task, run) -> accuracy as served
        # (task, run_id) -> why it was refused. Complete runs never change, so a run refused for a
        # permanent reason (see permanent()) is not retried (nor re-counted) at every poll while it
        # stays published; a transient failure is never kept here.
        self._refused: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ what the service asks
    def is_resident(self, name: str) -> bool:
        """Whether ``name``'s tables are in the engine now (else they load on its next request)."""
        return name in self.table.resident

    def quality(self, info: RunInfo) -> TaskQuality | None:
        """What is known of ``info``'s accuracy as served (None until it was first loaded)."""
        return self._qualities.get((info.task.name, info.run_id))

    def refusal(self, info: RunInfo) -> str | None:
        """Why ``info`` was refused for good, or None."""
        return self._refused.get((info.task.name, info.run_id))

    async def lease(self, info: RunInfo) -> ActiveTask:
        """``info`` (its task's published version) with its tables in the engine, leased to the caller.

        A cache miss loads it now (one load however many requests ask at once). The caller gives the
        lease back with :meth:`release`. Raises :class:`RunRefused` or :class:`TaskUnavailable`.
        """
        name = info.task.name
        refused = self.refusal(info)
        if refused is not None:
            raise RunRefused(f"task {name}: its published run cannot be served: {refused}")
        task = self.table.get(name)
        if task is not None and task.run_id == info.run_id:
            self.table.hold(task)
            return task
        try:
            return await self._load_once(info, reason="request")
        except NoFreeRowError as err:
            raise TaskUnavailable(f"task {name}: {err} (waited {self.slot_wait_seconds:g} s for a free one)") from None
        except Exception as err:
            reason = failure_reason(info, err)
            if permanent(err):  # the run itself cannot be served: refused until another run is published
                self._refused[(name, info.run_id)] = reason
                raise RunRefused(f"task {name}: its published run cannot be served: {reason}") from None
            raise TaskUnavailable(
                f"task {name}: its tables are unavailable right now ({reason}); not refused, retry shortly"
            ) from None

    def release(self, task: ActiveTask) -> None:
        """Give back a lease from :meth:`lease`."""
        self.table.release(task)

    async def warm(self, info: RunInfo) -> None:
        """Reload: check ``info`` and, if its task is resident or a row is free, load it now (so the task
        stays warm) with its accuracy known before it is reported live; otherwise it loads on its first
        request. Nothing is evicted. Raises what failed, having refused the run for good if it is permanent.
        """
        try:
            self._check(info)
            if self.is_resident(info.task.name) or self.table.free_rows() > 0:
                loaded = await self._load_once(info, reason="reload")
                self.table.release(loaded)
                if loaded.measuring is not None:
                    await loaded.measuring
        except Exception as err:
            if permanent(err):  # a transient failure is tried again at the next poll or request
                self._refused[(info.task.name, info.run_id)] = failure_reason(info, err)
            raise

    def remove(self, name: str) -> None:
        """``name`` is no longer published: no new request gets it; its row frees once unleased."""
        self.table.remove(name)

    # ------------------------------------------------------------------ the lifecycle
    def _check(self, info: RunInfo) -> None:
        """What can be checked without the tables: the model it was made on, its label words."""
        check_fingerprint(info.run_id, info.fingerprint, self.model)
        label_token_ids(info.task, self.tokenizer)

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
        raises :class:`NoFreeRowError`: a request never waits unboundedly on others.
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
            # vectors [L, 2, d], coefficients [L, 2, 2] -> tables beta [L, 2, 2], shift [L, 2, 2, d] (row 0 = none)
            tables = InjectionTables.build([torch.from_numpy(run.vectors)], [torch.from_numpy(run.coefficients)])
            beta, shift = pack_tables(tables.beta[:, :, 1:], tables.shift[:, :, 1:])  # row 1 = this run
            task_row = await self._reserve_row()
            try:
                await self._write_rows([task_row], beta, shift)
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
        if self._adopt(info, reason):
            self.table.activate(active)
        else:
            self.table.retire(active)  # a reload replaced or removed it meanwhile: serve the waiters, then free
        self.metrics.loads.labels(reason).inc()
        self.metrics.load_latency.observe(time.perf_counter() - start)
        active.quality = self._qualities.get(key)
        if active.quality is None:
            self.table.hold(active)
            active.measuring = asyncio.ensure_future(self._record_quality(run, active))
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

    async def _record_quality(self, run: StoredRun, task: ActiveTask) -> None:
        """Record the run's accuracy in the serving dtype (once per version; survives evictions).

        Called with a lease on ``task`` held for it, which it gives back.
        """
        try:
            quality = await self._measure(run, task)
        except Exception as err:  # a background measurement must not take the server down
            logger.error("ifedicl: task %s run %s: accuracy not measured: %s", run.task.name, run.run_id, err)
            return
        finally:
            self.table.release(task)
        self._qualities[(run.task.name, run.run_id)] = task.quality = quality
