"""A real Prometheus on loopback scrapes a real ``ifedicl serve`` and the store-metrics
exporter; every PromQL expression shipped in deploy/ must evaluate, and every dashboard
panel must return data once traffic has flowed (alerts may be valid and empty: not firing).
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
from serving_helpers import SHORT_TEXTS, free_port, published_store, running_server

from ifedicl.federation_job.recalibrate import RecalibrationCollector
from ifedicl.storage.recalibrations import Attempt, record_attempt

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


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def served_store(tmp_path_factory, serving_models) -> str:
    """Two published tasks and recalibration history in one store."""
    uri = str(tmp_path_factory.mktemp("prom-store") / "store")
    store = published_store(uri, serving_models["llama"], ("sst2", "agnews"), first_seed=50)
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
    """Classifications on both tasks over 8 s of 1 s scrapes (rate() needs two points), one 404, one reload."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        for task in ("sst2", "agnews"):
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
    # eager: what is scraped does not depend on compilation (~30 s here; test_serving_equivalence covers it)
    eager = ["--enforce-eager"]
    with running_server(served_store, serving_models["llama"], tmp_path / "serve.log", extra=eager) as server:
        targets = {"ifedicl-serving": server.port, "ifedicl-store": store_port}
        with running_prometheus(tmp_path, targets) as base:
            _send_traffic(server)
            _wait_for_scrapes(base)
            for expr in _dashboard_exprs():
                result = _query(base, expr)
                assert result["status"] == "success", (expr, result)
                assert result["data"]["result"], f"dashboard expression returned no data: {expr}"
            for expr in _rule_exprs():
                result = _query(base, expr)  # alerts may be valid and empty (not firing)
                assert result["status"] == "success", (expr, result)
            active = _query(base, "ifedicl_active_run")["data"]["result"]
            assert {r["metric"]["task"] for r in active} == {"sst2", "agnews"}
            errors = _query(base, 'ifedicl_request_errors_total{code="404"}')["data"]["result"]
            assert errors and float(errors[0]["value"][1]) >= 1
            rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())
            health = [rule["health"] for group in rules["data"]["groups"] for rule in group["rules"]]
            assert health and all(h in ("ok", "unknown") for h in health), health
