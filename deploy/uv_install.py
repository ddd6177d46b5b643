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
(for example ``.venv/bin/python -e ".[cpu,dev]"``). Standard library only: it runs before the project
is installed.
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
    python, install_args = argv[0], argv[1:]
    if install_with_uv(python, install_args):
        return 0
    return subprocess.run([python, "-m", "pip", "install", *install_args]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
