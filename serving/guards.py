"""What every request must pass before any route runs, and what every engine request must carry.

**HTTP** (:class:`RequestGuard`, outermost ASGI middleware). vLLM's own ``--api-key``
middleware guards only paths under ``/v1`` (and a few other prefixes) and answers
``{"error": "Unauthorized"}``: ``POST /admin/reload`` and ``POST /classify`` would stay
open, and OpenAI clients could not parse the refusal. The guard turns the rule around:
with keys configured, every path needs one except the probes in :data:`OPEN_PATHS`
(Kubernetes readiness, Prometheus scrapes), which change nothing and reveal no request
data; ``/admin/reload`` needs the admin key when one is set. Then, in this order:

- **requests in flight**: at most ``max_requests_in_flight`` at once (429 with
  ``Retry-After``); the probes never count, so readiness holds under overload;
- **body size**: a declared ``Content-Length`` over the limit is refused at once, a
  chunked body as soon as it passes the limit (413);
- **JSON shape**: nesting depth and element count are measured on the raw bytes
  (:func:`json_shape`) *before* ``json.loads`` builds any object, so neither a
  ``[[[[...`` body (a RecursionError, then a 500) nor a million ``{}`` get parsed (400);
- **engine-internal fields**: ``cache_salt`` and the ``vllm_xargs`` keys the server
  itself sets (:data:`INTERNAL_EXTRA_ARGS`) are refused on every route (400 naming the
  field): with them a caller could compute KV blocks under any task row and plant them
  in the prefix cache under another caller's salt;
- **inputs**: every route's ``prompt``/``input`` list (times ``n``) is capped by
  ``--max-inputs-per-request``, the base model's requests included (400).

The last two run here for vLLM's own routes and in :mod:`ifedicl.serving.api` for the
routes it dispatches (:data:`DISPATCHED_PATHS`), where the refusal is counted under its task.

The body is parsed once here and handed to our routes (:data:`PARSED_JSON_KEY`). Every refusal is a
:mod:`~ifedicl.serving.domain_errors` error; the answer it becomes (status, body, headers) is
:func:`ifedicl.serving.api.http_error`'s, handed in as ``answer``.

**Engine** (:class:`EngineIsolation`). The HTTP checks name the fields vLLM's routes
read today; the engine is isolated whatever route a request came by. Every request
reaches the engine core through one call, ``engine_core.add_request_async``; there,
a request the classification service did not stamp with this process's secret token
loses every internal extra arg and gets the base model's salt, and the service's own
requests get their salts keyed by a secret. No salt is derivable from ``/v1/models``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ifedicl.model_patches.vllm_runner import TASK_ROW_KEY
from ifedicl.serving.domain_errors import BadRequest, BodyTooLarge, Overloaded, ServingError, Unauthenticated

logger = logging.getLogger("ifedicl.serving")

# Read-only probes that stay reachable without a key (the runbook says so) and never count as in flight.
OPEN_PATHS = frozenset({"/health", "/metrics"})
# Paths that need the admin key when one is configured (--admin-api-key / IFEDICL_ADMIN_API_KEY).
ADMIN_PATHS = frozenset({"/admin/reload"})

# The routes serving.api dispatches on ``model``: they check engine-internal fields and inputs themselves, so a
# refusal is counted under the task (or ``_base``) it was for; the guard checks them on every other route.
DISPATCHED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/classify", "/classify"})

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
# HTTP requests one server works on at once, over every route. Each holds at most --max-body-bytes of body and
# --max-inputs-per-request engine requests; above the cap a request gets 429 at once. 1,024 keeps a burst of
# 1,000 single-text requests (tests/serving/test_serving_load.py) whole.
DEFAULT_MAX_REQUESTS_IN_FLIGHT = 1024
# No OpenAI or vLLM request nests deeper than ~10 (tool schemas included); Python's parser recurses per level.
MAX_JSON_DEPTH = 64
# Array items, object members and containers of one body: 256 token-id prompts of 1,024 tokens fit. Parsed,
# each element costs ~30-100 B of Python objects, so one body stays within ~25 MB whatever its shape.
MAX_JSON_ELEMENTS = 2**18
RETRY_AFTER_SECONDS = 1

# Where the parsed body travels from the guard to our routes (serving.api.read_json).
PARSED_JSON_KEY = "ifedicl.json"
# sampling_params.extra_args key that marks the classification service's own engine requests.
INTERNAL_TOKEN_KEY = "ifedicl_internal"
# extra_args keys only the server may set: the task row, and the mark above.
INTERNAL_EXTRA_ARGS = frozenset({TASK_ROW_KEY, INTERNAL_TOKEN_KEY})

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")  # not JSON: size-checked only
# A JSON string from its opening quote to its closing one, or to the end of a truncated body. Possessive, and
# it always matches from a quote: every byte is looked at once, whatever the body.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)


def endpoint_label(path: str) -> str:
    return ENDPOINTS.get(path, "other")


class Answer(Protocol):
    """What :func:`ifedicl.serving.api.http_error` returns: the refusal as the client receives it."""

    status: int
    body: dict
    headers: dict[str, str]


def too_many_requests(limit: int) -> Overloaded:
    return Overloaded(
        f"Too many requests in flight: this server works on at most {limit} at once "
        f"(--max-requests-in-flight); retry after {RETRY_AFTER_SECONDS} s",
        retry_after_s=RETRY_AFTER_SECONDS,
    )


# ---------------------------------------------------------------------------------------------- JSON bodies
def json_shape(body: bytes) -> tuple[int, int]:
    """``(depth, elements)`` of a JSON text, read from its bytes without building it.

    Strings are blanked first (a bracket or comma inside one is text), then depth is
    the running sum of openings minus closings, and elements are the commas plus the
    containers: each array item and object member after the first adds a comma. Both
    are exact for valid JSON and an upper bound for the rest (which the parser then refuses).
    """
    if body.count(b"[") + body.count(b"{") <= 1 and body.count(b",") < MAX_JSON_ELEMENTS:
        return body.count(b"[") + body.count(b"{"), body.count(b",") + 1  # flat: nothing to scan
    bare = np.frombuffer(_JSON_STRING.sub(b"0", body), dtype=np.uint8)
    opens = (bare == ord("[")) | (bare == ord("{"))
    brackets = np.flatnonzero(opens | (bare == ord("]")) | (bare == ord("}")))
    depth = int(np.cumsum(np.where(opens[brackets], 1, -1)).max()) if brackets.size else 0
    return depth, int(np.count_nonzero(bare == ord(","))) + int(np.count_nonzero(opens))


def parse_json_body(body: bytes, max_depth: int = MAX_JSON_DEPTH, max_elements: int = MAX_JSON_ELEMENTS):
    """The JSON value of ``body``, or a 400 naming what is wrong; the limits hold before any parsing."""
    depth, elements = json_shape(body)
    if depth > max_depth:
        raise BadRequest(f"The JSON body nests {depth} levels deep; this server accepts at most {max_depth}")
    if elements > max_elements:
        raise BadRequest(
            f"The JSON body has {elements} elements (array items, object members, containers); "
            f"this server accepts at most {max_elements}"
        )
    try:
        return json.loads(body)
    except UnicodeDecodeError as err:  # JSON is Unicode: a Latin-1 or binary body says so, not "invalid JSON"
        raise BadRequest(f"The request body is not UTF-8 encoded JSON: {err}") from None
    except json.JSONDecodeError as err:
        raise BadRequest(f"Invalid JSON body: {err}") from None


def check_internal_fields(body: dict) -> None:
    """400 naming the field if ``body`` sets what only the server may: a prefix-cache salt or an internal
    extra arg (``vllm_xargs`` of the OpenAI/Anthropic routes, ``sampling_params.extra_args`` of
    ``/inference/v1/generate``)."""
    if body.get("cache_salt") is not None:
        raise BadRequest("'cache_salt' is set by this server; requests may not set it", "cache_salt")
    sampling = body.get("sampling_params")
    for param, extra in (
        ("vllm_xargs", body.get("vllm_xargs")),
        ("sampling_params.extra_args", sampling.get("extra_args") if isinstance(sampling, dict) else None),
    ):
        if isinstance(extra, dict) and (taken := sorted(INTERNAL_EXTRA_ARGS & extra.keys())):
            field = f"{param}.{taken[0]}"
            raise BadRequest(f"'{field}' is set by this server; requests may not set it", field)


def _inputs_in(value) -> int:
    """How many prompts a ``prompt``/``input`` value holds: a string, a token-id list or a conversation
    (a list of objects, the Responses API's items) is one; a list of strings or token lists is one each."""
    if not isinstance(value, list) or not value:
        return 1 if value is not None else 0
    if all(isinstance(v, int) for v in value) or any(isinstance(v, dict) for v in value):
        return 1
    return len(value)


def _conversations_in(value) -> int:
    """A chat request's conversations: ``messages`` is one, or a list of them (``/v1/chat/completions/batch``)."""
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return len(value)
    return 1


def check_inputs(body: dict, max_inputs: int) -> None:
    """400 if ``body`` asks for more than ``max_inputs`` prompts (each times ``n``): on every route, so a base
    model request cannot fan out into unbounded engine requests either."""
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    for param in ("prompt", "input", "messages"):
        if param not in body:
            continue
        count = _conversations_in(body[param]) if param == "messages" else _inputs_in(body[param])
        if count * n > max_inputs:
            asks = f"{count} inputs" if n == 1 else f"{count} inputs x n={n}"
            raise BadRequest(
                f"'{param}' has {asks}; this server accepts at most {max_inputs} per request "
                "(--max-inputs-per-request): split the batch",
                param if count > 1 or n == 1 else "n",
            )


# ---------------------------------------------------------------------------------------------- HTTP
def _key_hashes(keys: Sequence[str]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]


class RequestGuard:
    """Pure ASGI middleware: 401, 429, 413 and 400 (module docstring), in OpenAI's error format.

    ``answer`` renders a refusal (:func:`ifedicl.serving.api.http_error`). ``on_refused(endpoint,
    status)`` is called for each refusal (the server counts them in ``ifedicl_request_errors_total``,
    429s under ``code="429"``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        answer: Callable[[ServingError], Answer],
        api_keys: Sequence[str],
        max_body_bytes: int,
        admin_api_keys: Sequence[str] = (),
        max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT,
        max_inputs: int | None = None,
        on_refused: Callable[[str, int], None] | None = None,
    ) -> None:
        self.app = app
        self.answer = answer
        self.key_hashes = _key_hashes(api_keys)
        self.admin_key_hashes = _key_hashes(admin_api_keys)
        self.max_body_bytes = max_body_bytes
        self.max_requests_in_flight = max_requests_in_flight
        self.max_inputs = max_inputs
        self.on_refused = on_refused
        self.in_flight = 0  # requests past the key check and not yet answered (one event loop: no lock)

    @staticmethod
    def _authorized(headers: Headers, hashes: list[bytes]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(key.strip().encode()).digest()
        match = False
        for known in hashes:  # compare with every key: timing says nothing about which
            match |= secrets.compare_digest(digest, known)
        return match

    def authorized(self, headers: Headers, path: str = "") -> bool:
        """The admin key on the admin paths when one is set; else any API key (none set: open)."""
        if path in ADMIN_PATHS and self.admin_key_hashes:
            return self._authorized(headers, self.admin_key_hashes)
        return not self.key_hashes or self._authorized(headers, self.key_hashes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not self.authorized(headers, path):
            admin = path in ADMIN_PATHS and self.admin_key_hashes
            await self._refuse(Unauthenticated(_ADMIN_KEY_MESSAGE if admin else _API_KEY_MESSAGE), path, send)
            return
        if self.in_flight >= self.max_requests_in_flight:
            await self._refuse(too_many_requests(self.max_requests_in_flight), path, send)
            return
        self.in_flight += 1
        try:
            await self._admitted(scope, receive, send, path, headers)
        finally:
            self.in_flight -= 1

    async def _admitted(self, scope: Scope, receive: Receive, send: Send, path: str, headers: Headers) -> None:
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(self._too_large(f"{int(declared)} bytes"), path, send)
            return
        chunks, size = [], 0  # the whole body, up to the limit, then replayed to the app
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._refuse(self._too_large(f"more than {self.max_body_bytes} bytes"), path, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and not headers.get("content-type", "").lower().startswith(_FORM_TYPES):
            try:
                parsed = self._checked(body, path)
            except ServingError as err:
                await self._refuse(err, path, send)
                return
            scope[PARSED_JSON_KEY] = parsed
        await self.app(scope, _replay(body, receive), send)

    def _checked(self, body: bytes, path: str):
        """The parsed body once every limit and field rule holds; :class:`BadRequest` otherwise."""
        parsed = parse_json_body(body)
        if isinstance(parsed, dict) and path not in DISPATCHED_PATHS:
            check_internal_fields(parsed)
            if self.max_inputs is not None:
                check_inputs(parsed, self.max_inputs)
        return parsed

    def _too_large(self, got: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"Request body too large: {got}; this server accepts at most {self.max_body_bytes} bytes "
            "(--max-body-bytes)"
        )

    async def _refuse(self, error: ServingError, path: str, send: Send) -> None:
        answer = self.answer(error)
        if self.on_refused is not None:
            self.on_refused(endpoint_label(path), answer.status)
        body = json.dumps(answer.body).encode()
        extra = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
        await send({
            "type": "http.response.start",
            "status": answer.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        })
        await send({"type": "http.response.body", "body": body})


_API_KEY_MESSAGE = "Invalid or missing API key: send 'Authorization: Bearer <key>'"
_ADMIN_KEY_MESSAGE = (
    "Invalid or missing admin key: this path needs 'Authorization: Bearer <admin key>' (--admin-api-key)"
)


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


# ---------------------------------------------------------------------------------------------- engine
class EngineIsolation:
    """Every engine request gets a salt keyed by a secret, and only the service's carry internal extra args.

    vLLM's prefix cache shares KV blocks between requests whose tokens and salt agree. KV
    computed under a task row differs from plain KV, so a block must only ever be reused
    under the row it was computed with. The service salts each (task, version); this
    makes every salt secret (``HMAC(secret, label)``), gives requests from any vLLM route
    the base model's own secret salt, and strips from them the extra args only the
    service may set. Installed once on the server's engine (:meth:`install`); the service
    talks to the engine through :meth:`internal`, which stamps its requests.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._token = secrets.token_hex(16)
        self.base_salt = self.salt("ifedicl/base")
        self.stripped = 0  # outside requests that carried an internal extra arg past the HTTP checks

    def salt(self, label: str) -> str:
        return hmac.new(self._secret, label.encode(), hashlib.sha256).hexdigest()

    def install(self, engine) -> None:
        """Route ``engine``'s one way into the engine core (AsyncLLM: every route, every ``n`` child) through
        :meth:`isolate`."""
        core = engine.engine_core
        add_request_async = core.add_request_async

        async def isolated_add_request_async(request) -> None:
            self.isolate(request)
            await add_request_async(request)

        core.add_request_async = isolated_add_request_async

    def isolate(self, request) -> None:
        """Rewrite an ``EngineCoreRequest`` in place before it leaves this process."""
        params = request.sampling_params
        extra = params.extra_args if params is not None else None
        token = extra.pop(INTERNAL_TOKEN_KEY, None) if extra else None
        if isinstance(token, str) and hmac.compare_digest(token, self._token):
            request.cache_salt = self.salt(f"ifedicl/internal/{request.cache_salt or ''}")
            return
        if extra and (taken := INTERNAL_EXTRA_ARGS & extra.keys()):
            for key in taken:
                del extra[key]
            self.stripped += 1
            logger.warning("ifedicl: request %s carried %s past the HTTP checks: removed", request.request_id, taken)
        request.cache_salt = self.base_salt

    def internal(self, engine) -> InternalEngine:
        """``engine`` as the classification service sees it: its requests carry this process's token."""
        return InternalEngine(engine, self._token)


class InternalEngine:
    """An engine client whose ``generate`` stamps ``sampling_params.extra_args`` with the internal token;
    everything else is the wrapped engine's (``model_config``, ``collective_rpc``, ...)."""

    def __init__(self, engine, token: str) -> None:
        self._engine = engine
        self._token = token

    def generate(self, prompt, sampling_params, request_id: str, **kwargs):
        sampling_params.extra_args = {**(sampling_params.extra_args or {}), INTERNAL_TOKEN_KEY: self._token}
        return self._engine.generate(prompt, sampling_params, request_id, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)
