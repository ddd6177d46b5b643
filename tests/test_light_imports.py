"""Commands that only read the store start no model stack (issue 32, item 6).

``ifedicl runs`` and the recalibration exporter read LanceDB and nothing else: importing torch (~2 s, ~400 MB)
or Ray there is pure cost, and the exporter pod would carry the whole federation stack. Each check runs the
real command in a fresh interpreter and reads that interpreter's ``sys.modules`` after it ran.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from ifedicl.storage import schema
from ifedicl.storage.store import Store

HEAVY = ("torch", "ray", "vllm", "transformers")


def _run_in_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last. Returns that line, parsed."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_LOADED = f"""
import json, sys
print(json.dumps({{"loaded": [m for m in {HEAVY!r} if m in sys.modules], "out": OUT}}))
"""


def test_ifedicl_runs_imports_no_torch(tmp_path):
    Store(tmp_path / "store", create=True)
    code = f"""
import contextlib, io, sys
from ifedicl.cli.main import main
sys.argv = ["ifedicl", "runs", "--store", {str(tmp_path / "store")!r}]
buffer = io.StringIO()
with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
    main()
OUT = buffer.getvalue()
""" + _LOADED
    child = _run_in_child(code)
    assert child["out"].strip() == "no runs"  # the command really ran against the store
    assert child["loaded"] == [], f"ifedicl runs imported {child['loaded']}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_recalibration_exporter_imports_neither_torch_nor_ray(tmp_path):
    """The exporter serves its metrics, then its serve-forever sleep is cut short to look at its imports."""
    Store(tmp_path / "store", create=True)
    port = _free_port()
    code = f"""
import contextlib, io, sys, time, urllib.request
from ifedicl.cli.main import main

def scrape_and_stop(seconds):
    global OUT
    OUT = urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    raise SystemExit(0)

time.sleep = scrape_and_stop  # the command's `while True: time.sleep(3600)`
OUT = ""
sys.argv = ["ifedicl", "recalibration-exporter", "--store", {str(tmp_path / "store")!r},
            "--port", "{port}", "--host", "127.0.0.1"]
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main()
""" + _LOADED
    child = _run_in_child(code)
    assert "ifedicl_store_up 1.0" in child["out"], child["out"][:2000]
    assert child["loaded"] == [], f"the exporter imported {child['loaded']}"


def test_the_exporters_module_imports_neither_torch_nor_ray():
    child = _run_in_child("import ifedicl.storage.store_metrics\nOUT = ''\n" + _LOADED)
    assert child["loaded"] == [], f"ifedicl.storage.store_metrics imported {child['loaded']}"


def test_the_stores_block_names_are_the_injection_axis():
    """storage spells the block words itself (no torch); they must index the vectors as injection does."""
    from ifedicl.model_patches import injection

    assert schema.BLOCKS == injection.BLOCKS
    assert (schema.BLOCKS.index("attn"), schema.BLOCKS.index("mlp")) == (injection.ATTN, injection.MLP)
