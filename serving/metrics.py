"""Prometheus metrics of the IFed-ICL server (``ifedicl_*``), next to vLLM's ``vllm:*``.

Names are fixed (the deploy/ dashboards and alerts rely on them). Labels stay
low-cardinality: ``task`` is a published task name, or ``_base`` (the plain base
model), ``_auto`` (model="auto") or ``_unknown`` (a name that is none of these),
never free text from a request.
The active-run gauge, the run ages and the cache gauges are computed at scrape
time from the service's tables, so they can never drift from what is actually served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ifedicl.serving.task_cache import TaskQuality

BASE_TASK_LABEL = "_base"
UNKNOWN_TASK_LABEL = "_unknown"
AUTO_TASK_LABEL = "_auto"  # model="auto" before routing (predictions count under the chosen task)

# Classification latencies on CPU range from milliseconds (tiny models) to seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
    ):
        self.requests = Counter(
            "ifedicl_requests", "Classification API requests", ["task", "endpoint"], registry=registry
        )
        self.errors = Counter(
            "ifedicl_request_errors", "Requests answered with an error, by HTTP status", ["task", "endpoint", "code"],
            registry=registry,
        )
        self.predictions = Counter(
            "ifedicl_predictions", "Predicted labels (one per classified text)", ["task", "label"], registry=registry
        )
        self.latency = Histogram(
            "ifedicl_classification_latency_seconds",
            "Time to classify one request (all its texts), from parsed request to scores",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
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
        self.routed = Counter("ifedicl_routed", "model=auto: texts routed, by chosen task", ["task"], registry=registry)
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
