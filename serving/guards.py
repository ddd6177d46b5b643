"""What every HTTP request must pass before any route runs: the API key, then the body size.

vLLM's own ``--api-key`` middleware guards only paths under ``/v1`` (and a few
other prefixes) and answers ``{"error": "Unauthorized"}``: ``POST /admin/reload``
and ``POST /classify`` would stay open, and OpenAI clients could not parse the
refusal. :class:`RequestGuard` sits outside every other middleware and turns the
rule around: with keys configured, every path needs one except the probes in
:data:`OPEN_PATHS` (Kubernetes readiness, Prometheus scrapes), which change nothing
and reveal no request data.

The body limit is checked before a route parses anything: a declared
``Content-Length`` over the limit is refused at once; a chunked body is read up to
the limit and refused as soon as it passes it, so an oversized request never
reaches JSON parsing or the engine queue.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ifedicl.serving.api_errors import ApiError, too_large, unauthorized

# Read-only probes that stay reachable without a key (the runbook says so).
OPEN_PATHS = frozenset({"/health", "/metrics"})

# Low-cardinality endpoint labels for the error counter (paths are free text from the client).
ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat_completions",
    "/v1/classify": "classify",
    "/classify": "classify",
    "/v1/models": "models",
    "/admin/reload": "admin_reload",
}

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # 256 inputs of ~16 KB of text each

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def endpoint_label(path: str) -> str:
    return ENDPOINTS.get(path, "other")


class RequestGuard:
    """Pure ASGI middleware: 401 without a valid key, 413 over ``max_body_bytes``, OpenAI error format.

    ``on_refused(endpoint, status)`` is called for each refusal (the server counts them
    in ``ifedicl_request_errors_total``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Sequence[str],
        max_body_bytes: int,
        on_refused: Callable[[str, int], None] | None = None,
    ) -> None:
        self.app = app
        self.key_hashes = [hashlib.sha256(k.encode()).digest() for k in api_keys if k]
        self.max_body_bytes = max_body_bytes
        self.on_refused = on_refused

    def authorized(self, headers: Headers) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(key.strip().encode()).digest()
        match = False
        for known in self.key_hashes:  # compare with every key: timing says nothing about which
            match |= secrets.compare_digest(digest, known)
        return match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        headers = Headers(scope=scope)
        if self.key_hashes and path not in OPEN_PATHS and not self.authorized(headers):
            await self._refuse(unauthorized(), path, send)
            return
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_body_bytes:
                await self._refuse(self._too_large(f"{int(declared)} bytes"), path, send)
                return
            await self.app(scope, receive, send)
            return
        # No length declared (chunked): buffer up to the limit, then replay to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._refuse(self._too_large(f"more than {self.max_body_bytes} bytes"), path, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_large(self, got: str) -> ApiError:
        return too_large(
            f"Request body too large: {got}; this server accepts at most {self.max_body_bytes} bytes "
            "(--max-body-bytes)"
        )

    async def _refuse(self, error: ApiError, path: str, send: Send) -> None:
        if self.on_refused is not None:
            self.on_refused(endpoint_label(path), error.status)
        body = json.dumps(error.body()).encode()
        extra = [(b"www-authenticate", b"Bearer")] if error.status == 401 else []
        await send({
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        })
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
