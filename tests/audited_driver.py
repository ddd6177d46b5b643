"""Runs one ``ifedicl`` command in this process and records every file this process touches under given roots.

Used by tests/test_org_federation.py to prove the driver never opens a client's data:

    python tests/audited_driver.py AUDIT.json ROOT[,ROOT...] -- federate --config orgs.toml ...

A Python audit hook (PEP 578) sees every ``open``, ``os.listdir``/``os.scandir`` and ``os.stat``-free
directory read this interpreter makes; hooks do not cross ``exec``, so the Ray workers hosting the
clients (fresh interpreters started by the raylet) are not audited: they are supposed to read the data.
"""

from __future__ import annotations

import json
import os
import sys

EVENTS = ("open", "os.listdir", "os.scandir", "glob.glob", "shutil.copyfile", "os.rename")


def main() -> int:
    audit_file, roots, rest = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    roots = [os.path.realpath(r) for r in roots]
    touched: list[list[str]] = []

    def hook(event: str, args: tuple) -> None:
        if event not in EVENTS or not args or not isinstance(args[0], str | bytes | os.PathLike):
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        if any(path == r or path.startswith(r + os.sep) for r in roots):
            touched.append([event, path])

    sys.addaudithook(hook)
    sys.argv = ["ifedicl", *(rest[1:] if rest[:1] == ["--"] else rest)]
    from ifedicl.cli.main import main as cli_main

    code = 0
    try:
        cli_main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        with open(audit_file, "w") as f:
            json.dump(touched, f)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
