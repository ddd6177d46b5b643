"""The layers in the folders: each package imports only the ones below it (README "Architecture").

An AST scan, not a convention: an upward import (``storage`` reaching into ``federation_job``,
``serving`` into the CLI) fails here with the file, the line and the rule it breaks.
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
    for package, allowed in MAY_IMPORT.items():
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

