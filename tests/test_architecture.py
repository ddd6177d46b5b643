"""The layers in the folders: each package imports only the ones below it (README "Architecture").

An AST scan, not a convention: an upward import (``storage`` reaching into ``federation_job``,
``serving`` into the CLI) fails here with the file, the line and the rule it breaks. Then the rules
of issue 32, item 6: what must stay light (the store, the recalibration exporter) imports no torch
or Ray, followed through every module it imports at import time; and only ``serving/api.py`` turns
the service's domain errors into HTTP status codes.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> the packages it may import (besides itself). Bottom to top.
MAY_IMPORT: dict[str, set[str]] = {
    "kernel": set(),
    "model_patches": {"kernel"},
    "storage": {"kernel", "model_patches"},
    "devkit": {"kernel"},
    "serving": {"kernel", "model_patches", "storage"},
    "federation_job": {"kernel", "model_patches", "storage"},
    "evaluation": {"kernel", "model_patches", "storage", "devkit", "federation_job"},
    "cli": {"kernel", "model_patches", "storage", "devkit", "serving", "federation_job", "evaluation"},
}
# Folders of scripts on top of the layers (not installed packages): they drive the library, never the CLI.
SCRIPTS_MAY_IMPORT: dict[str, set[str]] = {"bench": set(MAY_IMPORT) - {"cli"}}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports, at any depth (function-local imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_every_package_imports_only_downward():
    violations = []
    for package, allowed in {**MAY_IMPORT, **SCRIPTS_MAY_IMPORT}.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for lineno, module in imported_modules(path):
                parts = module.split(".")
                if parts[0] in MAY_IMPORT:
                    violations.append(f"{path.relative_to(ROOT)}:{lineno} imports {module}: use ifedicl.{module}")
                elif parts[0] == "ifedicl" and len(parts) > 1 and parts[1] != package and parts[1] not in allowed:
                    violations.append(
                        f"{path.relative_to(ROOT)}:{lineno} imports {module}: {package} may import only "
                        f"{sorted(allowed) or 'nothing of ifedicl'}"
                    )
    assert not violations, "\n".join(violations)


def test_the_installed_packages_are_the_layers_under_one_namespace():
    """Every layer ships as ``ifedicl.<folder>``; no generic top-level name lands in site-packages."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"ifedicl.{name}": name for name in MAY_IMPORT}
    assert sorted(setuptools["packages"]) == sorted(f"ifedicl.{name}" for name in MAY_IMPORT)
    python_folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert python_folders == set(MAY_IMPORT), "a package folder without a layer (or a layer without a folder)"


def test_no_two_modules_share_a_name_across_layers():
    """One name, one job: ``server.py`` in two packages doing different things is how newcomers get lost.

    ``cli/`` is exempt by design: each of its modules is named after the command it declares
    (``cli/recalibrate.py`` is ``ifedicl recalibrate``, over ``federation_job/recalibrate.py``).
    """
    seen: dict[str, Path] = {}
    clashes = []
    for package in set(MAY_IMPORT) - {"cli"}:
        for path in (ROOT / package).rglob("*.py"):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            if path.name in seen:
                clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
            seen[path.name] = path
    assert not clashes, clashes


def test_code_in_strings_imports_through_the_namespace_too():
    """Code run by ``python -c`` or a child process is a string the import check cannot parse: a pre-namespace
    module path there only fails when that child runs."""
    import re

    old_path = re.compile(rf"\b(?:from|import) (?:{'|'.join(MAY_IMPORT)})\b")
    found = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.parts[len(ROOT.parts)].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and old_path.search(node.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:80]!r}")
    assert not found, "\n".join(found)



# ---------------------------------------------------------------------------------------------- light imports
# Third-party packages that are, or import at once, the heavy stacks.
TORCH = frozenset({"torch", "transformers", "vllm", "peft", "accelerate", "safetensors.torch"})
RAY = frozenset({"ray"})


def _module_file(module: str) -> Path | None:
    """The file of an ``ifedicl.<layer>...`` module, or None (third-party, or not a module)."""
    parts = module.split(".")
    if parts[0] != "ifedicl" or len(parts) < 2:
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def import_time_imports(path: Path, function: str | None = None) -> list[tuple[int, str]]:
    """The modules importing ``path`` imports (top-level statements; ``if TYPE_CHECKING:`` skipped), or,
    given ``function``, the ones that function's body imports when it runs. ``from a import b`` names
    ``a.b`` too when ``b`` is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if function is None:
        nodes, stack = [], list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                stack += node.orelse
                continue
            nodes.append(node)
            stack += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    else:
        (found,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
        nodes = list(ast.walk(found))
    modules = []
    for node in nodes:
        if isinstance(node, ast.Import):
            modules += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append((node.lineno, node.module))
            modules += [
                (node.lineno, f"{node.module}.{alias.name}")
                for alias in node.names
                if _module_file(f"{node.module}.{alias.name}") is not None
            ]
    return modules


def heavy_import_chain(path: Path, heavy: frozenset[str], function: str | None = None) -> list[str] | None:
    """The chain of imports by which importing ``path`` (or running ``function`` in it) imports one of
    ``heavy``; None if it does not. Followed through ifedicl's own modules, depth first."""
    seen: set[Path] = set()

    def visit(file: Path, fn: str | None) -> list[str] | None:
        if fn is None:
            if file in seen:
                return None
            seen.add(file)
        for lineno, module in import_time_imports(file, fn):
            where = f"{file.relative_to(ROOT)}:{lineno} imports {module}"
            if module in heavy or module.split(".")[0] in heavy:
                return [where]
            target = _module_file(module)
            # a submodule runs its packages' __init__ first
            parents = [_module_file(".".join(module.split(".")[:i])) for i in range(2, module.count(".") + 1)]
            for step in [*parents, target]:
                if step is not None and (chain := visit(step, None)) is not None:
                    return [where, *chain]
        return None

    chain = visit(path, function)
    if function is not None and chain is None:
        chain = visit(path, None)  # the function's module is imported first
    return chain


def test_the_store_imports_no_torch():
    """Reading the store (``ifedicl runs``, the exporter, ``predict``'s checks) must not start torch;
    tests/test_light_imports.py runs ``ifedicl runs`` to see it."""
    chains = [chain for path in sorted((ROOT / "storage").glob("*.py")) if (chain := heavy_import_chain(path, TORCH))]
    assert not chains, "\n".join(" -> ".join(chain) for chain in chains)


def test_the_recalibration_exporter_imports_neither_ray_nor_torch():
    """``ifedicl recalibration-exporter``: the command's module, what its function imports, and the collector."""
    for path, function in (
        (ROOT / "storage" / "store_metrics.py", None),
        (ROOT / "cli" / "recalibrate.py", "recalibration_exporter_command"),
    ):
        chain = heavy_import_chain(path, RAY | TORCH, function)
        assert chain is None, " -> ".join(chain)


def test_the_light_import_check_sees_a_heavy_chain():
    """The check itself: the driver reaches Ray, the service torch (through ifedicl modules)."""
    assert heavy_import_chain(ROOT / "federation_job" / "recalibrate.py", RAY) is not None
    assert heavy_import_chain(ROOT / "serving" / "api.py", TORCH) is not None
    assert heavy_import_chain(ROOT / "cli" / "recalibrate.py", RAY, "recalibrate_command") is not None


# ---------------------------------------------------------------------------------------------- HTTP in one place
HTTP_ONLY_IN = ROOT / "serving" / "api.py"
_HTTP_NAMES = frozenset({"status_code", "HTTPException", "HTTPStatus", "JSONResponse", "Response"})


def test_only_serving_api_maps_errors_to_http():
    """The service, the task cache and the guard raise domain errors (serving/domain_errors.py); the status,
    error type and headers each becomes are serving/api.py's ``HTTP_ERRORS`` alone. Elsewhere in serving/:
    no status code (an integer 400-599), no ``status_code``, no HTTP exception or response class."""
    found = []
    for path in sorted((ROOT / "serving").glob("*.py")):
        if path == HTTP_ONLY_IN:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.alias):
                name = node.asname or node.name.split(".")[-1]
            if isinstance(node, ast.keyword):
                name = node.arg
            if name in _HTTP_NAMES:
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}: {name}")
            if isinstance(node, ast.Constant) and type(node.value) is int and 400 <= node.value < 600:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: status-like integer {node.value}")
    assert not found, "map domain errors to HTTP in serving/api.py only:\n" + "\n".join(found)


def test_every_domain_error_has_an_http_answer():
    """A new domain error without an entry would fail at its first request; here it fails at once."""
    from ifedicl.serving import api, domain_errors

    base = domain_errors.ServingError
    errors = [cls for cls in vars(domain_errors).values() if isinstance(cls, type) and issubclass(cls, base)]
    errors.remove(base)
    unmapped = [cls.__name__ for cls in errors if not any(base in api.HTTP_ERRORS for base in cls.__mro__)]
    assert not unmapped, f"no HTTP_ERRORS entry for {unmapped}"
