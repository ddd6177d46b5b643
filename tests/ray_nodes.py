"""Real Ray nodes on this machine for the cluster tests: `ray start` heads and workers, always stopped.

Each node is one `ray start --block` in its own session, on its own free ports, under the cluster's
own temp dir, with token authentication on (Ray 2.60's default once a token exists). Stopping a
node kills its process group and every descendant that left it (a job's entrypoint, say), then
anything still naming the cluster's temp dir: never `ray stop`, which stops every Ray on the machine,
other people's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ifedicl.serving.process import free_port

RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started."
# What a node's log says when a port it was given is already bound.
_PORT_TAKEN = ("Address already in use", "Failed to start the grpc server")
# A GCS too busy to answer a joining node within Ray's own RPC deadline (seen on a loaded 2-core CI machine, the
# head alive): the node's start failed, not the cluster, so it is tried again like a taken port.
_GCS_BUSY = ("Deadline Exceeded", "timed out during startup")


def _stats() -> dict[int, list[str]]:
    """{pid: the fields of /proc/PID/stat after the command name} for every process (state, ppid, pgid, ...)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                out[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    return out


def _naming(text: str) -> set[int]:
    """Processes whose command line contains ``text`` (the cluster's unique temp dir)."""
    pids = set()
    for pid in _stats():
        with contextlib.suppress(OSError):
            if pid != os.getpid() and text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
    return pids


def node_processes(start_pid: int) -> set[int]:
    """A `ray start --block` process, its process group (raylet, agents, workers) and their descendants."""
    stats = _stats()
    found = {pid for pid, fields in stats.items() if int(fields[2]) == start_pid} | {start_pid}
    while more := {pid for pid, fields in stats.items() if int(fields[1]) in found} - found:
        found |= more
    return found


def kill_all(pids: set[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _alive(pids: set[int]) -> set[int]:
    stats = _stats()
    return {pid for pid in pids if pid in stats and stats[pid][0] != "Z"}


class RayNode:
    """One `ray start --block` process and everything it started."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path, timeout_s: float = 120):
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [RAY, "start", "--block", *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while STARTED not in log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"ray node {name} did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def pids(self) -> set[int]:
        return node_processes(self.process.pid)

    def kill(self, sig: int = signal.SIGKILL) -> set[int]:
        """Signal every process of the node at once (SIGKILL: the node dies as a machine would)."""
        pids = self.pids()
        kill_all(pids, sig)
        return pids

    def stop(self, grace_s: float = 3.0) -> None:
        pids = self.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_all(_alive(pids | self.pids()), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


class LocalRayCluster:
    """A head and worker nodes on this machine, token auth on, stopped by :meth:`stop` (idempotent).

    ``env`` is what every node, job and client of this cluster runs with: ``HOME`` holds the
    token file (``~/.ray/auth_token``, made by ``ray get-auth-token --generate`` as the README
    says) and ``RAY_AUTH_MODE=token``.
    """

    def __init__(self, base_env: dict[str, str] | None = None):
        # short: Ray's unix socket paths live under it (108-byte limit)
        self.root = Path(tempfile.mkdtemp(prefix="ifr-", dir="/tmp"))
        self.home = self.root / "home"
        self.home.mkdir()
        self.env = {**(base_env or os.environ), "HOME": str(self.home), "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.nodes: list[RayNode] = []
        self.gcs_address = ""
        self.dashboard_url = ""

    def generate_token(self) -> str:
        """``ray get-auth-token --generate``: writes ~/.ray/auth_token (here: under the cluster's HOME)."""
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        return self.token

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def _node_args(
        self, num_cpus: int, resources: dict | None, object_store_bytes: int, labels: str | None = None
    ) -> list[str]:
        args = [
            "--num-cpus", str(num_cpus),
            "--object-store-memory", str(object_store_bytes),
            "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()),
            "--min-worker-port", "0",  # workers take OS-assigned ports: no clash with other Rays here
            "--max-worker-port", "0",
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--disable-usage-stats",
        ]  # fmt: skip
        if resources:
            args += ["--resources", json.dumps(resources)]
        if labels:
            args += ["--labels", labels]
        return args

    def _start(
        self, name: str, node_args: Callable[[], list[str]], env: dict | None = None, attempts: int = 3
    ) -> RayNode:
        """Start a node (``env``: variables of this node only, which its workers inherit); a port taken between
        :func:`free_port`'s pick and the bind means fresh ports, and a GCS too busy to answer in time another try,
        not a failure."""
        node_env = {**self.env, **(env or {})}
        for _ in range(attempts - 1):
            try:
                node = RayNode(name, node_args(), node_env, self.root / f"{name}.log")
                break
            except RuntimeError as error:
                if not any(sign in str(error) for sign in (*_PORT_TAKEN, *_GCS_BUSY)):
                    raise
        else:
            node = RayNode(name, node_args(), node_env, self.root / f"{name}.log")  # the last try: its error is final
        self.nodes.append(node)
        return node

    def start_head(
        self, num_cpus: int = 2, resources: dict | None = None, object_store_bytes: int = 200 << 20,
        env: dict | None = None, labels: str | None = None,
    ):  # fmt: skip
        ports: dict[str, int] = {}

        def head_args() -> list[str]:
            ports.update(gcs=free_port(), dashboard=free_port())
            return [
                "--head", "--port", str(ports["gcs"]),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
                "--ray-client-server-port", str(free_port()),
                "--temp-dir", str(self.root / "ray"),
                *self._node_args(num_cpus, resources, object_store_bytes, labels),
            ]  # fmt: skip

        node = self._start("head", head_args, env)
        self.gcs_address = f"127.0.0.1:{ports['gcs']}"
        self.dashboard_url = f"http://127.0.0.1:{ports['dashboard']}"
        return node

    def add_worker(
        self, num_cpus: int = 2, resources: dict | None = None, object_store_bytes: int = 200 << 20,
        env: dict | None = None, labels: str | None = None,
    ):  # fmt: skip
        return self._start(
            f"worker{len(self.nodes)}",
            lambda: ["--address", self.gcs_address, *self._node_args(num_cpus, resources, object_store_bytes, labels)],
            env,
        )

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        leftovers = _naming(str(self.root))
        kill_all(leftovers, signal.SIGKILL)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
