"""One client on a real host, in the test's own process: what a Ray actor would run, without Ray.

The tests that look at what a client uploads call :class:`~ifedicl.federation_job.actors.HostedClient`
methods directly (bytes in, bytes out), exactly as ``ClientHost.call`` does inside an actor.
"""

from __future__ import annotations

from pathlib import Path

from ifedicl.federation_job.actors import ClientHost, HostedClient
from ifedicl.federation_job.privacy import ClientPrivacy
from ifedicl.kernel.sources import ClientSource, DataSource


def hosted_client(
    model: Path | str, source: DataSource, rows: list[int], client_id: int = 0, privacy: ClientPrivacy | None = None
) -> HostedClient:
    """Client ``client_id`` holding ``rows`` of ``source``, joined to a host of its own that loaded ``model``."""
    host = ClientHost(str(model), str(model))
    member = ClientSource(f"client-{client_id}", source, indices=tuple(rows))
    host.join(client_id, member, source.load().task, privacy)
    return host.clients[client_id]
