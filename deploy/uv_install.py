"""Install packages into a virtual environment with uv, under the machine's pip configuration.

Why: ``pip install`` of this project (torch, vLLM, Ray, transformers) took 3 min 14 s on 2 cores,
half of it compiling bytecode one file at a time; uv resolves the same versions (compared with
``pip freeze``) and compiles on every core: 59 s. The bytecode is kept because a process that
imports vLLM from uncompiled sources spends twice the CPU doing it (40 s instead of 19 here), and
``PYTHONDONTWRITEBYTECODE`` may forbid writing it later.

uv deliberately ignores ``pip.conf`` and ``PIP_*`` variables, so the index settings a machine has
for pip (find-links, extra indexes, constraints, certificate, trusted hosts) are read from
``pip config list`` and passed on, with pip's rule of taking the best version across all indexes.
Where uv cannot be installed or fails, pip installs as before: uv is only the fast path.

Usage: ``python deploy/uv_install.py VENV_PYTHON PIP_INSTALL_ARGS...``
(for example ``.venv/bin/python -e ".[cpu,dev]" --constraint requirements-cpu.lock``). Standard library
only: it runs before the project is installed.

The lock files: ``python deploy/uv_install.py --lock VENV_PYTHON cpu|gpu [UV_COMPILE_ARGS...]`` writes
``requirements-<build>.lock``, every package of ``.[<build>,cluster,eval,dev]`` at one version, resolved by
``uv pip compile`` under the same index settings for CPython 3.11 on x86_64 Linux (glibc 2.34+), keeping
the versions the file already pins unless ``--upgrade`` is passed. Why two files and not ``uv lock``: the
two vLLM builds need two torch builds of the same version (``2.13.0+cpu`` from the CPU wheel source,
``2.13.0`` with CUDA from PyPI), which ``uv lock``'s one universal resolution can only express by routing
torch to per-extra indexes in pyproject, tying the project to index URLs this machine's pip configuration
already provides. The GPU lock is compiled without find-links (where the CPU wheels lie: ``==2.13.0``
would otherwise lock ``2.13.0+cpu``). ``make install`` installs the project with its build's lock as
constraints.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

# pip's option -> uv's flag, for the options that choose where packages come from (many values each).
LIST_OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
# Where pip looks for a setting, most specific first.
SECTIONS = (":env:", "install", "global")


def pip_settings(python: str) -> dict[str, list[str]]:
    """The effective index settings of ``python -m pip`` (files and ``PIP_*`` variables), by option."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    by_section: dict[tuple[str, str], str] = {}
    for line in listed.stdout.splitlines():
        key, _, quoted = line.partition("=")
        section, _, option = key.rpartition(".")
        if section in SECTIONS and quoted:
            by_section[(section, option)] = ast.literal_eval(quoted)
    settings: dict[str, list[str]] = {}
    for option in (*LIST_OPTIONS, "cert", "no-index"):
        for section in SECTIONS:
            if (section, option) in by_section:
                settings[option] = by_section[(section, option)].split()
                break
    return settings


def uv_command(uv: Path, python: str, settings: dict[str, list[str]], install_args: list[str]) -> list[str]:
    command = [str(uv), "pip", "install", "--python", python, "--compile-bytecode",
               "--index-strategy", "unsafe-best-match"]  # fmt: skip
    for option, flag in LIST_OPTIONS.items():
        for value in settings.get(option, []):
            command += [flag, value]
    if settings.get("no-index", ["false"])[0].lower() in ("1", "true", "yes", "on"):
        command.append("--no-index")
    return command + install_args


LOCK_EXTRAS = "cluster,eval,dev"  # with the vLLM build: what make install installs
LOCK_PLATFORM = ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_34")


def lock_path(build: str) -> Path:
    return Path(__file__).resolve().parent.parent / f"requirements-{build}.lock"


def compile_command(uv: Path, settings: dict[str, list[str]], build: str, compile_args: list[str]) -> list[str]:
    """``uv pip compile`` of pyproject's ``build`` (cpu or gpu) install into its lock file."""
    if build not in ("cpu", "gpu"):
        raise ValueError(f"--lock: build must be cpu or gpu, not {build!r}")
    if build == "gpu":  # the CPU torch wheels lie behind find-links: a GPU lock must not see them
        settings = {k: v for k, v in settings.items() if k != "find-links"}
    root = lock_path(build).parent
    extras = [arg for extra in (build, *LOCK_EXTRAS.split(",")) for arg in ("--extra", extra)]
    command = [str(uv), "pip", "compile", str(root / "pyproject.toml"), *extras, *LOCK_PLATFORM,
               "--index-strategy", "unsafe-best-match", "--custom-compile-command", "make lock",
               "-o", str(lock_path(build))]  # fmt: skip
    for option, flag in LIST_OPTIONS.items():
        for value in settings.get(option, []):
            command += [flag, value]
    return command + compile_args


def lock(python: str, build: str, compile_args: list[str]) -> int:
    subprocess.run([python, "-m", "pip", "install", "-q", "uv>=0.5"], check=True)
    settings = pip_settings(python)
    env = dict(os.environ)
    if settings.get("cert"):
        env["SSL_CERT_FILE"] = settings["cert"][0]
    command = compile_command(Path(python).parent / "uv", settings, build, compile_args)
    return subprocess.run(command, env=env, cwd=lock_path(build).parent).returncode


def install_with_uv(python: str, install_args: list[str]) -> bool:
    """True when uv installed everything; False (after saying why) when pip should."""
    try:
        subprocess.run([python, "-m", "pip", "install", "-q", "uv>=0.5"], check=True)
        settings = pip_settings(python)
        env = dict(os.environ)
        if settings.get("cert"):
            env["SSL_CERT_FILE"] = settings["cert"][0]
        uv = Path(python).parent / "uv"
        subprocess.run(uv_command(uv, python, settings, install_args), check=True, env=env)
        return True
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"uv_install: uv did not install ({error}); installing with pip instead", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "--lock":
        if len(argv) < 3:
            print(__doc__, file=sys.stderr)
            return 2
        return lock(argv[1], argv[2], argv[3:])
    python, install_args = argv[0], argv[1:]
    if install_with_uv(python, install_args):
        return 0
    return subprocess.run([python, "-m", "pip", "install", *install_args]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
