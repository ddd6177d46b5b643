"""The store as Prometheus metrics: recalibration attempts and what each task publishes.

What ``ifedicl recalibration-exporter`` serves (``ifedicl_recalibration_*``, ``ifedicl_store_*``). It
reads only the store, so it lives in the storage layer and imports neither torch nor Ray: the exporter
pod starts in a second and holds no model stack (``tests/test_light_imports.py`` checks it).
"""

from __future__ import annotations

import logging
import time

from ifedicl.storage.recalibrations import attempts
from ifedicl.storage.store import Store

log = logging.getLogger("ifedicl.recalibrate")


class RecalibrationCollector:
    """Prometheus collector over the store: recalibration attempts and what is published.

    Register it in any process that can read the store (``prometheus_client.REGISTRY.register(
    RecalibrationCollector(uri))``) or run ``ifedicl recalibration-exporter``. Reads are cached
    for ``ttl_s`` so a scrape never hammers the store.
    """

    def __init__(self, store_uri: str, ttl_s: float = 10.0):
        self.store_uri = store_uri
        self.ttl_s = ttl_s
        self._cache: tuple[float, list] | None = None

    def describe(self):
        return []  # collected lazily: the store may not exist yet at registration

    def collect(self):
        if self._cache and time.monotonic() - self._cache[0] < self.ttl_s:
            return iter(self._cache[1])
        families = self._families()
        self._cache = (time.monotonic(), families)
        return iter(families)

    def _families(self) -> list:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("ifedicl_store_up", "1 if the store could be read on the last scrape")
        try:
            store = Store(self.store_uri)
            rows = attempts(store)
            published = store.published()
            pub_rows = store.publication_log()
            store.require_present()  # moved away mid-read: the empty tables are not the store's state
        except Exception as err:
            log.warning("recalibration metrics: cannot read store %s: %s", self.store_uri, err)
            up.add_metric([], 0.0)
            return [up]
        up.add_metric([], 1.0)
        total = CounterMetricFamily(
            "ifedicl_recalibration_attempts", "Recalibration attempts by decision", labels=["task", "decision"]
        )
        last_attempt = GaugeMetricFamily(
            "ifedicl_recalibration_last_attempt_timestamp_seconds", "End of the last attempt", labels=["task"]
        )
        last_success = GaugeMetricFamily(
            "ifedicl_recalibration_last_success_timestamp_seconds",
            "End of the last attempt that ran to a decision (published or kept_live)",
            labels=["task"],
        )
        last_publish = GaugeMetricFamily(
            "ifedicl_recalibration_last_publish_timestamp_seconds",
            "End of the last attempt that published",
            labels=["task"],
        )
        failures = GaugeMetricFamily(
            "ifedicl_recalibration_consecutive_failures",
            "Failed attempts since the last one that ran to a decision",
            labels=["task"],
        )
        cand = GaugeMetricFamily(
            "ifedicl_recalibration_candidate_accuracy", "Held-out accuracy of the last candidate", labels=["task"]
        )
        live = GaugeMetricFamily(
            "ifedicl_recalibration_live_accuracy", "Held-out accuracy of the live run, last attempt", labels=["task"]
        )
        store_pub = GaugeMetricFamily(
            "ifedicl_store_published_run", "Published run per task in the store (1)", labels=["task", "run_id"]
        )
        store_pub_ts = GaugeMetricFamily(
            "ifedicl_store_last_publication_timestamp_seconds",
            "Time of the last publish or rollback of a task in the store",
            labels=["task"],
        )
        by_task: dict[str, list[dict]] = {}
        for row in rows:
            by_task.setdefault(row["task"], []).append(row)
        for task, task_rows in sorted(by_task.items()):
            counts: dict[str, int] = {}
            for row in task_rows:
                counts[row["decision"]] = counts.get(row["decision"], 0) + 1
            for decision in ("published", "kept_live", "failed", "busy"):
                total.add_metric([task, decision], float(counts.get(decision, 0)))
            last_attempt.add_metric([task], task_rows[-1]["finished_at"].timestamp())
            decided = [r for r in task_rows if r["decision"] in ("published", "kept_live")]
            if decided:
                last_success.add_metric([task], decided[-1]["finished_at"].timestamp())
                last = decided[-1]
                if last["candidate_accuracy"] is not None:
                    cand.add_metric([task], last["candidate_accuracy"])
                if last["live_accuracy"] is not None:
                    live.add_metric([task], last["live_accuracy"])
            pubs = [r for r in task_rows if r["decision"] == "published"]
            if pubs:
                last_publish.add_metric([task], pubs[-1]["finished_at"].timestamp())
            streak = 0
            for row in reversed(task_rows):
                if row["decision"] in ("published", "kept_live"):
                    break
                streak += row["decision"] == "failed"
            failures.add_metric([task], float(streak))
        for task, run_id in sorted(published.items()):
            store_pub.add_metric([task, run_id], 1.0)
        latest: dict[str, float] = {}
        for row in pub_rows:
            latest[row["task"]] = max(latest.get(row["task"], 0.0), row["at"].timestamp())
        for task, ts in sorted(latest.items()):
            store_pub_ts.add_metric([task], ts)
        return [up, total, last_attempt, last_success, last_publish, failures, cand, live, store_pub, store_pub_ts]
