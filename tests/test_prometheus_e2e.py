"""A real Prometheus on loopback scrapes real exporters; every PromQL expression shipped in
deploy/ (dashboard panels and alert rules) must evaluate, and dashboard panels must return data.

Targets: the real RecalibrationCollector over a real LanceDB store (ifedicl_recalibration_*,
ifedicl_store_*), and a prometheus_client exporter emitting the serving metric names
(ifedicl_* of serving/metrics.py and vLLM's vllm:*). The serving-backed variant (a real
`ifedicl serve`) is pending; this proves every expression parses and evaluates on real series.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from federation_job.recalibrate import RecalibrationCollector
from storage.recalibrations import Attempt, record_attempt
from storage.store import Store

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving_like_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    req = Counter("ifedicl_requests", "r", ["task", "endpoint"], registry=reg)
    err = Counter("ifedicl_request_errors", "e", ["task", "endpoint", "code"], registry=reg)
    pred = Counter("ifedicl_predictions", "p", ["task", "label"], registry=reg)
    lat = Histogram("ifedicl_classification_latency_seconds", "l", ["task"], registry=reg)
    Gauge("ifedicl_active_run", "a", ["task", "run_id"], registry=reg).labels("sst2", "sst2-run-1").set(1)
    Gauge("ifedicl_published_run_age_seconds", "g", ["task"], registry=reg).labels("sst2").set(120)
    Counter("ifedicl_reloads", "r", registry=reg).inc()
    Counter("ifedicl_reload_failures", "f", registry=reg)
    Gauge("vllm:num_requests_running", "r", ["model_name", "engine"], registry=reg).labels("m", "0").set(1)
    Gauge("vllm:num_requests_waiting", "w", ["model_name", "engine"], registry=reg).labels("m", "0").set(0)
    Gauge("vllm:kv_cache_usage_perc", "k", ["model_name", "engine"], registry=reg).labels("m", "0").set(0.1)
    e2e = Histogram("vllm:e2e_request_latency_seconds", "e", ["model_name", "engine"], registry=reg)
    tokens = Counter("vllm:prompt_tokens", "t", ["model_name", "engine"], registry=reg)
    for i in range(50):
        req.labels("sst2", "/v1/classify").inc()
        err.labels("sst2", "/v1/classify", "422").inc(i % 10 == 0)
        pred.labels("sst2", "positive" if i % 3 else "negative").inc()
        lat.labels("sst2").observe(0.01 * (i % 7 + 1))
        e2e.labels("m", "0").observe(0.02)
        tokens.labels("m", "0").inc(12)
    return reg


def _serve_text_format(port: int, registry: CollectorRegistry) -> None:
    """Always the Prometheus text format 0.0.4: prometheus_client 0.26's OpenMetrics output rewrites
    `vllm:x` sample names to `vllm_x`, and Prometheus 2.42 prefers OpenMetrics (see deploy/README.md)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana/ifedicl-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_every_shipped_promql_expression_evaluates_on_a_real_prometheus(tmp_path):
    prom = shutil.which("prometheus")
    assert prom, "prometheus not found: run .ci/install-system-deps.sh (Debian package `prometheus`)"
    store_dir = tmp_path / "store"
    store = Store(store_dir, create=True)
    record_attempt(store, Attempt("a1", "sst2", "stage2", 0.01, decision="failed", reason="boom"))
    record_attempt(
        store,
        Attempt(
            "a2", "sst2", "stage2", 0.01, decision="published", reason="ok", candidate_accuracy=0.9, live_accuracy=0.88
        ),
    )
    store_reg = CollectorRegistry()
    store_reg.register(RecalibrationCollector(str(store_dir), ttl_s=0))
    serving_port, store_port, prom_port = _port(), _port(), _port()
    _serve_text_format(serving_port, _serving_like_registry())
    start_http_server(store_port, addr="127.0.0.1", registry=store_reg)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus/alerts.yml")],
        "scrape_configs": [
            {"job_name": "ifedicl-serving", "static_configs": [{"targets": [f"127.0.0.1:{serving_port}"]}]},
            {"job_name": "ifedicl-store", "static_configs": [{"targets": [f"127.0.0.1:{store_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            prom,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{prom_port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for two scrapes of both targets so rate() has two points
            try:
                up = _query(base, "count_over_time(up[1m])")["data"]["result"]
                if len(up) == 2 and all(float(r["value"][1]) >= 3 for r in up):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "prometheus did not scrape both targets"
            time.sleep(0.5)
        for expr in _dashboard_exprs():
            expr = expr.replace("$__rate_interval", "1m")
            expr = re.sub(r'task=~"\$task"', 'task=~".*"', expr)
            res = _query(base, expr)
            assert res["status"] == "success", (expr, res)
            assert res["data"]["result"], f"dashboard expression returned no data: {expr}"
        for expr in _rule_exprs():
            res = _query(base, expr)  # alerts may be valid and empty (not firing)
            assert res["status"] == "success", (expr, res)
        firing = _query(base, "ifedicl_recalibration_consecutive_failures")["data"]["result"]
        assert float(firing[0]["value"][1]) == 0  # the publish after the failure reset the streak
        rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())
        health = [r["health"] for g in rules["data"]["groups"] for r in g["rules"]]
        assert health and all(h in ("ok", "unknown") for h in health), health
    finally:
        proc.terminate()
        proc.wait(timeout=30)
