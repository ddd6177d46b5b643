"""deploy/ checked with the real tools: promtool, and offline schema validation of every manifest.

Kubernetes objects: the `kubernetes-validate` PyPI package (bundled Kubernetes JSON schemas, strict mode).
KubeRay RayJobs: deploy/schemas/kuberay/rayjob-ray-v1.json (vendored, derived from KubeRay's v1 API types),
with its embedded Kubernetes types resolved against the same bundled schemas. Needs no network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.33.0"


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: run .ci/install-system-deps.sh (Debian package `prometheus`)"
    return path


def test_promtool_check_config_and_rules():
    config, rules = DEPLOY / "prometheus/prometheus.yml", DEPLOY / "prometheus/alerts.yml"
    for args in (["check", "config", config], ["check", "rules", rules]):
        proc = subprocess.run([_promtool(), *map(str, args)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout + proc.stderr


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
                # manifests carried inside ConfigMaps (the CronJob's RayJob template) are checked too
                if doc.get("kind") == "ConfigMap":
                    for key, text in doc.get("data", {}).items():
                        if key.endswith((".yaml", ".yml")):
                            docs.append((f"{path.name}:{key}", yaml.safe_load(text)))
    return docs


def _kuberay_validator() -> jsonschema.Validator:
    schema = json.loads((DEPLOY / "schemas/kuberay/rayjob-ray-v1.json").read_text())
    defs = schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    # the vendored schema's $id is https://ifedicl.local/...; its "/api/_definitions.json" refs resolve there
    resource = Resource.from_contents(defs)
    registry = Registry().with_resources(
        [("/api/_definitions.json", resource), ("https://ifedicl.local/api/_definitions.json", resource)]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_every_manifest_validates_against_kubernetes_and_kuberay_schemas():
    docs = _documents()
    kinds = sorted({d["kind"] for _, d in docs})
    assert {"Deployment", "Service", "RayJob", "CronJob", "ConfigMap", "Secret"} <= set(kinds), kinds
    kuberay = _kuberay_validator()
    for where, doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in kuberay.iter_errors(doc)]
            assert not errors, f"{where} {doc['kind']}: {errors}"
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validators_reject_broken_manifests():
    """The checks have teeth: a typo in a KubeRay field and in a Kubernetes field both fail."""
    docs = dict((f"{w}/{d['kind']}", d) for w, d in _documents())
    rayjob = json.loads(json.dumps(docs["rayjob-federate.yaml/RayJob"]))
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    assert list(_kuberay_validator().iter_errors(rayjob))
    rayjob = json.loads(json.dumps(docs["rayjob-federate.yaml/RayJob"]))
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    assert list(_kuberay_validator().iter_errors(rayjob))  # embedded pod templates are checked strictly too
    cron = json.loads(json.dumps(docs["recalibrate-cronjob.yaml/CronJob"]))
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    cron["spec"]["concurencyPolicy"] = "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_serving_readiness_and_store_uri_wiring():
    docs = {(d["kind"], d["metadata"].get("name")): d for _, d in _documents()}
    pod = docs[("Deployment", "ifedicl-serving")]["spec"]["template"]["spec"]
    serve = next(c for c in pod["containers"] if c["name"] == "serve")
    assert serve["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"secretRef": {"name": "ifedicl-store"}} in serve["envFrom"]
    assert "STORE_URI" in docs[("Secret", "ifedicl-store")]["stringData"]


def test_grafana_dashboard_has_variables_and_required_panels():
    dash = json.loads((DEPLOY / "grafana/ifedicl-dashboard.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["task"]["type"] == "query"
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in (
        "ifedicl_requests_total",
        "ifedicl_request_errors_total",
        "ifedicl_classification_latency_seconds_bucket",
        "ifedicl_predictions_total",
        "ifedicl_active_run",
        "ifedicl_recalibration_last_attempt_timestamp_seconds",
        "vllm:num_requests_running",
        "vllm:e2e_request_latency_seconds_bucket",
    ):
        assert metric in exprs, metric
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
