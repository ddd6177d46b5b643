"""A real Prometheus on loopback scrapes a real ``ifedicl serve`` (with model="auto") and the
recalibration exporter under the job names of deploy/prometheus/prometheus.yml; every PromQL
expression shipped in deploy/ must evaluate, and every dashboard panel must return data once
traffic has flowed (alerts may be valid and empty: not firing). Client errors (a 404) must not
appear in the paging error-ratio expression.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from serving_helpers import SHORT_TEXTS, TASKS, free_port, publish_run, running_server

from ifedicl.storage.recalibrations import Attempt, record_attempt
from ifedicl.storage.store_metrics import RecalibrationCollector

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

pytestmark = pytest.mark.vllm


def _query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/ifedicl-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return [re.sub(r'task=~"\$task"', 'task=~".*"', e.replace("$__rate_interval", "1m")) for e in exprs]


def _rules() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def _jobs() -> list[str]:
    """The scrape job names the shipped alerts (up/absent) and dashboard expect: serving first, exporter second."""
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = [c["job_name"] for c in config["scrape_configs"]]
    assert jobs == ["ifedicl-serving", "ifedicl-recalibration-exporter"], jobs
    return jobs


@pytest.fixture(scope="module")
def served_store(tmp_path_factory, serving_models) -> str:
    """Two published tasks (with their held-out accuracy) and recalibration history in one store."""
    from ifedicl.storage.store import Store

    uri = str(tmp_path_factory.mktemp("prom-store") / "store")
    store = Store(uri, create=True)
    for i, name in enumerate(("sst2", "agnews")):
        seed = 50 + i
        publish_run(store, serving_models["llama"], TASKS[name], seed=seed, summary={"seed": seed, "accuracy": 0.8})
    record_attempt(store, Attempt("a1", "sst2", "stage2", 0.01, decision="failed", reason="boom"))
    record_attempt(
        store,
        Attempt(
            "a2", "sst2", "stage2", 0.01, decision="published", reason="ok", candidate_accuracy=0.9, live_accuracy=0.88
        ),
    )
    return uri


@contextmanager
def running_prometheus(tmp_path: Path, targets: dict[str, int]) -> Iterator[str]:
    """A real Prometheus on loopback scraping ``{job: port}`` every second, with the shipped rules."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus not found: run .ci/install-system-deps.sh (Debian package `prometheus`)"
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus/alerts.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}
            for job, target in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _send_traffic(server) -> None:
    """Classifications on both tasks and model="auto" over 8 s of 1 s scrapes (rate() needs two points),
    one 404, one reload."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        for task in ("sst2", "agnews", "auto"):
            client.completions.create(model=task, prompt=SHORT_TEXTS, max_tokens=1)
        time.sleep(0.5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-task", prompt="x", max_tokens=1)
    assert httpx.post(f"{server.base_url}/admin/reload", timeout=60).status_code == 200
    client.completions.create(model="sst2", prompt=SHORT_TEXTS, max_tokens=1)


def _wait_for_scrapes(base: str) -> None:
    """Several scrapes after the last request, so every series has rate() points."""
    deadline = time.monotonic() + 90
    while True:
        try:
            up = _query(base, "count_over_time(up[1m])")["data"]["result"]
            last = _query(base, 'count_over_time(ifedicl_request_errors_total{code="404"}[1m])')["data"]["result"]
            if len(up) == 2 and last and float(last[0]["value"][1]) >= 5:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "prometheus did not scrape both targets"
        time.sleep(1)


def test_every_shipped_promql_expression_evaluates_against_a_real_server(tmp_path, serving_models, served_store):
    store_registry = CollectorRegistry()
    store_registry.register(RecalibrationCollector(served_store, ttl_s=0))
    store_port = free_port()
    start_http_server(store_port, addr="127.0.0.1", registry=store_registry)
    serving_job, exporter_job = _jobs()
    # eager: what is scraped does not depend on compilation (~30 s here; test_serving_equivalence covers it)
    extra = ["--enforce-eager", "--auto-route"]
    with running_server(served_store, serving_models["llama"], tmp_path / "serve.log", extra=extra) as server:
        targets = {serving_job: server.port, exporter_job: store_port}
        with running_prometheus(tmp_path, targets) as base:
            _send_traffic(server)
            _wait_for_scrapes(base)
            for expr in _dashboard_exprs():
                result = _query(base, expr)
                assert result["status"] == "success", (expr, result)
                assert result["data"]["result"], f"dashboard expression returned no data: {expr}"
            rules = _rules()
            for expr in rules.values():
                result = _query(base, expr)  # alerts may be valid and empty (not firing)
                assert result["status"] == "success", (expr, result)
            active = _query(base, "ifedicl_active_run")["data"]["result"]
            assert {r["metric"]["task"] for r in active} == {"sst2", "agnews"}
            errors = _query(base, 'ifedicl_request_errors_total{code="404"}')["data"]["result"]
            assert errors and float(errors[0]["value"][1]) >= 1
            # the 404 counts under _unknown, whose error ratio is 1; the paging ratio counts server errors only
            all_errors = "sum by (task) (rate(ifedicl_request_errors_total[5m]))"
            all_errors += " / sum by (task) (rate(ifedicl_requests_total[5m]))"
            assert {r["metric"]["task"] for r in _query(base, all_errors)["data"]["result"]} == {"_unknown"}
            assert _query(base, rules["IfediclHighErrorRatio"])["data"]["result"] == []
            # both targets are up: neither the up == 0 nor the absent() alerts have anything to say
            for alert in ("IfediclServingDown", "IfediclServingAbsent", "IfediclRecalibrationExporterDown",
                          "IfediclRecalibrationExporterAbsent"):  # fmt: skip
                assert _query(base, rules[alert])["data"]["result"] == [], alert
            # bounded labels: the latency histogram has none per task, the per-task counters do
            buckets = _query(base, "ifedicl_classification_latency_seconds_bucket")["data"]["result"]
            assert buckets and all("task" not in r["metric"] for r in buckets)
            per_task = _query(base, "ifedicl_classifications_total")["data"]["result"]
            assert {"sst2", "agnews"} <= {r["metric"]["task"] for r in per_task}
            routed = _query(base, "ifedicl_routed_total")["data"]["result"]
            assert routed and {r["metric"]["task"] for r in routed} <= {"sst2", "agnews"}
            rules_state = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())
            health = [rule["health"] for group in rules_state["data"]["groups"] for rule in group["rules"]]
            assert health and all(h in ("ok", "unknown") for h in health), health
