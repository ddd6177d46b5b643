"""``ifedicl serve`` as a child process: started, waited for, stopped.

Used wherever a caller needs a real server beside itself (``ifedicl demo``, the
serving tests): the server is exactly what an operator runs, on a loopback port.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# Ports come from below Linux's ephemeral range (32768-60999 by default): a port the kernel hands
# out for bind(0) is free only until the next outgoing connection or OS-assigned port takes it,
# which is how a Ray head's GCS once lost its port between the pick and the bind.
PORT_RANGE = range(20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now, outside the ephemeral range, never handed out twice by this process.

    Someone may still bind it before the caller does: callers that start a server on it retry on
    "address in use" (``tests/ray_nodes.py``) or fail with the server's own message.
    """
    for _ in range(1000):
        port = random.randrange(PORT_RANGE.start, PORT_RANGE.stop)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")


class ServeProcess:
    """``ifedicl serve --store STORE --model MODEL ARGS`` on a free loopback port, logging to a file."""

    def __init__(self, store: str, model: str | Path, log_path: Path, args: Sequence[str] = ()):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            sys.executable, "-m", "ifedicl.cli", "serve", "--store", str(store), "--model", str(model),
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ]  # fmt: skip
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until ``/health`` answers; raise with the log's tail if the server exits or hangs.

        ``/health`` stays open with ``--api-key``, and the server only listens once the
        engine runs and the published tasks are loaded.
        """
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ifedicl serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"ifedicl serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


@contextmanager
def ready(proc: ServeProcess) -> Iterator[ServeProcess]:
    """``proc`` ready for the duration of the block, stopped afterwards whatever happens."""
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
