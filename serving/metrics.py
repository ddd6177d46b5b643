"""Prometheus metrics of the IFed-ICL server (``ifedicl_*``), next to vLLM's ``vllm:*``.

Names are fixed (the deploy/ dashboards and alerts rely on them). Labels stay
low-cardinality: ``task`` is a published task name, or ``_base`` (the plain base
model), ``_auto`` (model="auto") or ``_unknown`` (a name that is none of these),
never free text from a request.

Cardinality is bounded: the traffic metrics (requests, errors, predictions, routed texts and the
per-task classification time) keep the first ``IFEDICL_METRICS_MAX_TASKS`` (default 100) distinct
task names a replica sees as their own ``task`` value; later task names share ``task="_other"``
(docs/runbook.md, "Label cardinality"). The latency histogram has no ``task`` label at all (12 buckets
per replica whatever the number of tasks); per-task latency is the ratio of two counters,
``ifedicl_classification_seconds_total{task} / ifedicl_classifications_total{task}``.
The state gauges below (active run, run age, accuracy) have one series per served task.
The active-run gauge, the run ages and the cache gauges are computed at scrape
time from the service's tables, so they can never drift from what is actually served.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ifedicl.serving.quality import TaskQuality

BASE_TASK_LABEL = "_base"
UNKNOWN_TASK_LABEL = "_unknown"
AUTO_TASK_LABEL = "_auto"  # model="auto" before routing (predictions count under the chosen task)
OTHER_TASK_LABEL = "_other"  # every task name beyond the first max_task_labels a replica saw
RESERVED_TASK_LABELS = frozenset({BASE_TASK_LABEL, UNKNOWN_TASK_LABEL, AUTO_TASK_LABEL, OTHER_TASK_LABEL})
MAX_TASKS_ENV = "IFEDICL_METRICS_MAX_TASKS"
DEFAULT_MAX_TASK_LABELS = 100

# Classification latencies on CPU range from milliseconds (tiny models) to seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TaskLabels:
    """The ``task`` label value for a task name: the first ``limit`` distinct names keep their own, later
    ones get ``_other``; the reserved labels (``_base``, ``_auto``, ``_unknown``, ``_other``) always pass.
    Kept names stay for the life of the process, so a task's series never switches label."""

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"the task label limit must be >= 0, got {limit}")
        self.limit = limit
        self._kept: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task: str) -> str:
        if task in RESERVED_TASK_LABELS or task in self._kept:
            return task
        with self._lock:
            if task in self._kept or len(self._kept) < self.limit:
                self._kept.add(task)
                return task
        return OTHER_TASK_LABEL


def max_task_labels_from_env() -> int:
    """``IFEDICL_METRICS_MAX_TASKS`` (default 100): distinct ``task`` label values per replica."""
    value = os.environ.get(MAX_TASKS_ENV, "").strip()
    return int(value) if value else DEFAULT_MAX_TASK_LABELS


class _CappedTask:
    """A labelled metric whose first label is ``task``: ``.labels(task, ...)`` goes through TaskLabels."""

    def __init__(self, metric, tasks: TaskLabels):
        self._metric, self._tasks = metric, tasks

    def labels(self, *values: str, **named: str):
        if values:
            values = (self._tasks(values[0]), *values[1:])
        elif "task" in named:
            named = {**named, "task": self._tasks(named["task"])}
        return self._metric.labels(*values, **named)

    def __getattr__(self, name: str):
        return getattr(self._metric, name)


class _TaskLatency:
    """``.labels(task).observe(seconds)``, as for a histogram with a task label, but bounded: the histogram
    has no task label, and the task's time and count go to two counters under its capped task label."""

    def __init__(self, histogram: Histogram, seconds: Counter, count: Counter, tasks: TaskLabels):
        self.histogram, self._seconds, self._count, self._tasks = histogram, seconds, count, tasks

    def labels(self, task: str) -> _TaskObservation:
        label = self._tasks(task)
        return _TaskObservation(self.histogram, self._seconds.labels(label), self._count.labels(label))


class _TaskObservation:
    def __init__(self, histogram: Histogram, seconds, count):
        self._histogram, self._seconds, self._count = histogram, seconds, count

    def observe(self, seconds: float) -> None:
        self._histogram.observe(seconds)
        self._seconds.inc(seconds)
        self._count.inc()


class _ActiveRunCollector(Collector):
    """``ifedicl_active_run{task,run_id} = 1`` and ``ifedicl_published_run_age_seconds{task}``."""

    def __init__(self, active: Callable[[], Iterable[tuple[str, str, datetime]]]):
        self._active = active

    def collect(self):
        runs = GaugeMetricFamily(
            "ifedicl_active_run",
            "Run served for each task (value 1; the run_id label says which)",
            labels=["task", "run_id"],
        )
        ages = GaugeMetricFamily(
            "ifedicl_published_run_age_seconds",
            "Seconds since the served run of each task was created",
            labels=["task"],
        )
        now = time.time()
        for task, run_id, created_at in self._active():
            runs.add_metric([task, run_id], 1.0)
            ages.add_metric([task], max(0.0, now - created_at.timestamp()))
        yield runs
        yield ages


class _AccuracyCollector(Collector):
    """``ifedicl_task_accuracy{task,run_id,dtype,measured}``: the run's accuracy as made and as served."""

    def __init__(self, qualities: Callable[[], Iterable[tuple[str, str, TaskQuality]]]):
        self._qualities = qualities

    def collect(self):
        family = GaugeMetricFamily(
            "ifedicl_task_accuracy",
            "Held-out accuracy of the served run: measured=run (as the run reported it, in its dtype) "
            "or measured=serving (re-scored through this server's engine in its dtype)",
            labels=["task", "run_id", "dtype", "measured"],
        )
        for task, run_id, q in self._qualities():
            if q.run_accuracy is not None:
                family.add_metric([task, run_id, q.run_dtype, "run"], q.run_accuracy)
            if q.serving_accuracy is not None:
                family.add_metric([task, run_id, q.serving_dtype, "serving"], q.serving_accuracy)
        yield family


class _CacheCollector(Collector):
    """``ifedicl_resident_tasks`` and ``ifedicl_task_slots``: how full the engine's task cache is."""

    def __init__(self, resident: Callable[[], int], slots: int):
        self._resident, self._slots = resident, slots

    def collect(self):
        yield GaugeMetricFamily(
            "ifedicl_resident_tasks", "Task versions whose tables are in the engine now", value=self._resident()
        )
        yield GaugeMetricFamily(
            "ifedicl_task_slots", "Engine table rows for task versions (--max-slots)", value=self._slots
        )


class ServingMetrics:
    """All ``ifedicl_*`` metrics, registered on one registry (vLLM's, in the server)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        active: Callable[[], Iterable[tuple[str, str, datetime]]],
        qualities: Callable[[], Iterable[tuple[str, str, TaskQuality]]] = tuple,
        resident: Callable[[], int] = int,
        slots: int = 0,
        max_task_labels: int | None = None,
    ):
        self.task_labels = TaskLabels(max_task_labels_from_env() if max_task_labels is None else max_task_labels)
        capped = (
            f"; task: the first {self.task_labels.limit} task names this replica saw ({MAX_TASKS_ENV}), "
            f"later ones {OTHER_TASK_LABEL}"
        )
        self.requests = _CappedTask(
            Counter(
                "ifedicl_requests", "Classification API requests" + capped, ["task", "endpoint"], registry=registry
            ),
            self.task_labels,
        )
        self.errors = _CappedTask(
            Counter(
                "ifedicl_request_errors",
                "Requests answered with an error, by HTTP status" + capped,
                ["task", "endpoint", "code"],
                registry=registry,
            ),
            self.task_labels,
        )
        self.predictions = _CappedTask(
            Counter(
                "ifedicl_predictions",
                "Predicted labels (one per classified text)" + capped,
                ["task", "label"],
                registry=registry,
            ),
            self.task_labels,
        )
        self.latency = _TaskLatency(
            Histogram(
                "ifedicl_classification_latency_seconds",
                "Time to classify one request (all its texts), from parsed request to scores, all tasks together "
                "(no task label: per task, ifedicl_classification_seconds_total / ifedicl_classifications_total)",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            Counter(
                "ifedicl_classification_seconds",
                "Total time spent classifying requests of the task (see ifedicl_classification_latency_seconds)"
                + capped,
                ["task"],
                registry=registry,
            ),
            Counter("ifedicl_classifications", "Requests classified" + capped, ["task"], registry=registry),
            self.task_labels,
        )
        self.reloads = Counter(
            "ifedicl_reloads", "Task versions made live by a reload after start-up", registry=registry
        )
        self.reload_failures = Counter(
            "ifedicl_reload_failures", "Runs refused at reload (bad, mismatched or unloadable)", registry=registry
        )
        # Same name and meaning as the store-metrics exporter's gauge (deploy/: IfediclStoreUnreadable),
        # seen from where it matters: a server that cannot read the store keeps serving what it has.
        self.store_up = Gauge(
            "ifedicl_store_up", "1 if the store could be read at the server's last reload", registry=registry
        )
        self.routing_latency = Histogram(
            "ifedicl_routing_latency_seconds",
            "model=auto: time to compute a request's signatures and find each text's nearest task",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.routed = _CappedTask(
            Counter("ifedicl_routed", "model=auto: texts routed, by chosen task" + capped, ["task"], registry=registry),
            self.task_labels,
        )
        self.loads = Counter(
            "ifedicl_task_loads",
            "Task versions written into the engine: reason=request (first request of a non-resident task) "
            "or reload (start-up and newly published runs)",
            ["reason"],
            registry=registry,
        )
        self.load_latency = Histogram(
            "ifedicl_task_load_seconds",
            "Time to read a task version's tables from the store and write them into the engine",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.evictions = Counter(
            "ifedicl_task_evictions",
            "Resident task versions dropped to make room (least recently used, never one in use)",
            registry=registry,
        )
        registry.register(_ActiveRunCollector(active))
        registry.register(_CacheCollector(resident, slots))
        registry.register(_AccuracyCollector(qualities))
