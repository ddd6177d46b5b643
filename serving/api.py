"""HTTP routes added to vLLM's own OpenAI-compatible app.

vLLM's app (``build_app`` + ``init_app_state``) keeps everything it already does
(health, tokenize, ``/metrics`` with its ``vllm:*`` metrics, the plain base model
through its own completion and chat handlers). These routes are placed in front
of vLLM's for the same paths and dispatch on ``model``:

- the base model name -> vLLM's original handler (plain, uninjected generation);
- a published task -> classification with that task's live version;
- anything else -> 404 in OpenAI's error format.

``GET /v1/models`` lists the base model plus every live task. ``POST /classify`` and
``POST /v1/classify`` answer in vLLM's classification shape (``probs`` in label
order, ``num_classes``), with our ``probabilities`` by label word and ``run_id``
added; ``POST /admin/reload`` is ours alone. Task models stream too: the label is
computed whole, then sent as OpenAI server-sent events.

This is the one module that speaks HTTP status codes: the service, the task cache and the
request guard raise :mod:`~ifedicl.serving.domain_errors`, and :data:`HTTP_ERRORS` says what
each becomes (status, OpenAI error ``type``, headers) through :func:`http_error`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from ifedicl.serving.domain_errors import (
    BadRequest,
    BodyTooLarge,
    InternalError,
    Overloaded,
    ServingError,
    TaskNotFound,
    TaskUnavailable,
    Unauthenticated,
)
from ifedicl.serving.guards import PARSED_JSON_KEY, check_inputs, check_internal_fields, parse_json_body
from ifedicl.serving.metrics import AUTO_TASK_LABEL, BASE_TASK_LABEL, UNKNOWN_TASK_LABEL
from ifedicl.serving.service import Classification, ClassificationService, Score

logger = logging.getLogger("ifedicl.serving")

# Every domain error's HTTP status and OpenAI error ``type`` (vLLM's names, so ours look like its own). A
# subclass answers as its nearest listed ancestor (RunRefused as TaskUnavailable).
HTTP_ERRORS: dict[type[ServingError], tuple[HTTPStatus, str]] = {
    BadRequest: (HTTPStatus.BAD_REQUEST, "BadRequestError"),
    Unauthenticated: (HTTPStatus.UNAUTHORIZED, "AuthenticationError"),
    TaskNotFound: (HTTPStatus.NOT_FOUND, "NotFoundError"),
    BodyTooLarge: (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "RequestEntityTooLargeError"),
    Overloaded: (HTTPStatus.TOO_MANY_REQUESTS, "RateLimitError"),
    InternalError: (HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError"),
    TaskUnavailable: (HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
}


@dataclass(frozen=True)
class HttpError:
    """A domain error as the client receives it: status, OpenAI error body, extra headers (lower-case)."""

    status: int
    body: dict
    headers: dict[str, str]

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers or None)


def http_error(err: ServingError) -> HttpError:
    """``err`` as an HTTP answer, by :data:`HTTP_ERRORS`: 401 names the scheme, 429 says when to retry."""
    status, kind = next(HTTP_ERRORS[cls] for cls in type(err).__mro__ if cls in HTTP_ERRORS)
    headers = {}
    if isinstance(err, Unauthenticated):
        headers["www-authenticate"] = "Bearer"
    if isinstance(err, Overloaded):
        headers["retry-after"] = str(err.retry_after_s)
    body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": int(status)}}
    return HttpError(int(status), body, headers)


async def read_json(raw: Request) -> dict:
    """The request body as a JSON object, or a 400.

    Parsed once, by :class:`~ifedicl.serving.guards.RequestGuard`, with its depth and size
    limits checked before parsing; without the guard (an app built in a test) it is parsed here
    under the same limits.
    """
    data = raw.scope[PARSED_JSON_KEY] if PARSED_JSON_KEY in raw.scope else parse_json_body(await raw.body())
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object")
    return data


def _model_name(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: a task name or the base model", "model")
    return model


def _texts(value, param: str) -> list[str]:
    """A string or a list of strings (OpenAI's ``prompt``/``input`` shapes); 400 otherwise."""
    if value is None:
        raise BadRequest(f"'{param}' is required", param)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest(f"'{param}' must be a string or a list of strings", param)


def _optional_int(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer in [{low}, {high}]", name)
    return value


def _scoring_options(body: dict) -> dict:
    """vLLM's request fields that apply to scoring: ``priority``, ``truncate_prompt_tokens``, ``user``."""
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string", "user")
    return {
        "priority": _optional_int(body, "priority", -(2**63), 2**63 - 1) or 0,
        "truncate": _optional_int(body, "truncate_prompt_tokens", -1, 2**31 - 1),
    }


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return bool(options.get("include_usage"))


def _chat_text(body: dict) -> str:
    """The text to classify from a chat request: the last user message's text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                return "".join(parts)
            break
    raise BadRequest("'messages' needs a user message with text content", "messages")


def _usage(result: Classification, completion: bool = True) -> dict:
    completion_tokens = len(result.scores) if completion else 0
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": result.prompt_tokens + completion_tokens}


def _routing(score: Score) -> dict:
    """model="auto": which task answered and how close the text was to it."""
    return {} if score.similarity is None else {"task": score.task, "similarity": score.similarity}


def _completion_logprobs(score: Score) -> dict:
    return {
        "tokens": [score.label],
        "token_logprobs": [score.logprobs[score.label]],
        "top_logprobs": [score.logprobs],
        "text_offset": [0],
    }


def _chat_logprobs(score: Score) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    top = [entry(word, lp) for word, lp in score.logprobs.items()]
    return {"content": [{**entry(score.label, score.logprobs[score.label]), "top_logprobs": top}]}


def completion_body(result: Classification) -> dict:
    """OpenAI ``text_completion``: one choice per prompt, the label word as its text."""
    choices = [
        {
            "index": i,
            "text": score.label,
            "finish_reason": "stop",
            "logprobs": _completion_logprobs(score),
            "probabilities": score.probabilities,
            **_routing(score),
        }
        for i, score in enumerate(result.scores)
    ]
    return {**_envelope(result, "text_completion", "cmpl"), "choices": choices, "usage": _usage(result)}


def _envelope(result: Classification, kind: str, id_prefix: str) -> dict:
    """The fields every OpenAI completion object starts with; the run id is the fingerprint."""
    return {
        "id": f"{id_prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": result.task,
        "system_fingerprint": result.run_id,
    }


def chat_body(result: Classification) -> dict:
    """OpenAI ``chat.completion``: the label word as the assistant message."""
    score = result.scores[0]
    return {
        **_envelope(result, "chat.completion", "chatcmpl"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": score.label},
            "finish_reason": "stop",
            "logprobs": _chat_logprobs(score),
            "probabilities": score.probabilities,
            **_routing(score),
        }],
        "usage": _usage(result),
    }


def completion_chunks(result: Classification, include_usage: bool) -> list[dict]:
    """``text_completion`` stream: per prompt a chunk with its label, then one with ``finish_reason``.

    Every chunk shares one id (the OpenAI client stitches choices by id and index);
    with ``include_usage`` a last chunk with empty choices carries the usage, and
    the others say ``usage: null``, as OpenAI's stream does.
    """
    head = _envelope(result, "text_completion", "cmpl")
    usage = {"usage": None} if include_usage else {}
    chunks = [
        {**head, "choices": [{"index": i, "text": score.label, "logprobs": _completion_logprobs(score),
                              "finish_reason": None, "probabilities": score.probabilities, **_routing(score)}],
         **usage}
        for i, score in enumerate(result.scores)
    ]
    chunks += [
        {**head, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}], **usage}
        for i in range(len(result.scores))
    ]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": _usage(result)})
    return chunks


def chat_chunks(result: Classification, include_usage: bool) -> list[dict]:
    """``chat.completion.chunk`` stream: the label as one delta, then ``finish_reason``, then usage."""
    head = _envelope(result, "chat.completion.chunk", "chatcmpl")
    score = result.scores[0]
    usage = {"usage": None} if include_usage else {}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": score.label},
                              "logprobs": _chat_logprobs(score), "finish_reason": None,
                              "probabilities": score.probabilities, **_routing(score)}], **usage},
        {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], **usage},
    ]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": _usage(result)})
    return chunks


def event_stream(chunks: list[dict]) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: ``data: {json}`` per chunk, then ``data: [DONE]``."""

    async def events():
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def classify_body(result: Classification) -> dict:
    """vLLM's ``ClassificationResponse`` (field for field) plus ``probabilities`` by word and ``run_id``."""
    return {
        "id": f"classify-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": result.task,
        "data": [
            {
                "index": i,
                "label": s.label,
                "probs": s.probs,
                "num_classes": len(s.probs),
                "probabilities": s.probabilities,
                **({"run_id": s.run_id, **_routing(s)} if s.similarity is not None else {}),
            }
            for i, s in enumerate(result.scores)
        ],
        "usage": _usage(result, completion=False),
        "run_id": result.run_id,
    }


def _original_endpoint(app: FastAPI, path: str, method: str) -> Callable | None:
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return route.endpoint
    return None


AUTO_MODEL = "auto"  # model="auto": route each text to the nearest task (serving.routing)


def install_routes(app: FastAPI, service: ClassificationService, base_names: list[str]) -> None:
    """Put the IFed-ICL routes in front of vLLM's on ``app``."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    vllm_completion = _original_endpoint(app, "/v1/completions", "POST")
    vllm_chat = _original_endpoint(app, "/v1/chat/completions", "POST")
    metrics = service.metrics

    def is_served(model: str) -> bool:
        return model in service.catalog or (model == AUTO_MODEL and service.router is not None)

    async def dispatch(
        raw: Request,
        endpoint: str,
        on_task: Callable[[str, dict], Awaitable[Response]],
        on_base: tuple[Callable | None, type] | None = None,
    ) -> Response:
        task_label = UNKNOWN_TASK_LABEL
        try:
            body = await read_json(raw)
            model = _model_name(body)
            if model in base_names and on_base is not None and on_base[0] is not None:
                task_label = BASE_TASK_LABEL
                check_internal_fields(body)  # the engine would drop them anyway (guards.EngineIsolation)
                check_inputs(body, service.max_inputs)
                handler, request_cls = on_base
                try:
                    parsed = request_cls.model_validate(body)
                except ValidationError as err:
                    raise BadRequest(f"Invalid request: {err}") from None
                # vLLM's own exception handlers answer whatever its handler raises.
                response = await handler(parsed, raw)
                if response.status_code >= 400:
                    metrics.errors.labels(task_label, endpoint, str(response.status_code)).inc()
                return response
            if not is_served(model):
                served = [*base_names, *sorted(service.catalog), *([AUTO_MODEL] if service.router else [])]
                raise TaskNotFound(f"The model `{model}` does not exist. Available: {served}")
            task_label = AUTO_TASK_LABEL if model == AUTO_MODEL else model
            check_internal_fields(body)  # a task's salt and row are the server's, never the caller's
            return await on_task(model, body)
        except Exception as err:
            if not isinstance(err, ServingError):  # keep serving; report in the same format
                if task_label == BASE_TASK_LABEL:
                    raise
                logger.exception("ifedicl: %s failed", endpoint)
                err = InternalError(f"{type(err).__name__}: {err}")
            answer = http_error(err)
            metrics.errors.labels(task_label, endpoint, str(answer.status)).inc()
            return answer.response()
        finally:
            metrics.requests.labels(task_label, endpoint).inc()

    async def run(model: str, texts, param: str, body: dict) -> Classification:
        """Classify under ``model``, or under each text's nearest task for model="auto"."""
        options = _scoring_options(body)
        if model == AUTO_MODEL:
            return await service.classify_auto(texts, param, **options)
        return await service.classify(model, texts, param, **options)

    async def task_completion(model: str, body: dict) -> Response:
        stream = body.get("stream")
        include_usage = _include_usage(body)
        result = await run(model, _texts(body.get("prompt"), "prompt"), "prompt", body)
        if stream:
            return event_stream(completion_chunks(result, include_usage))
        return JSONResponse(completion_body(result))

    async def task_chat(model: str, body: dict) -> Response:
        stream = body.get("stream")
        include_usage = _include_usage(body)
        result = await run(model, [_chat_text(body)], "messages", body)
        if stream:
            return event_stream(chat_chunks(result, include_usage))
        return JSONResponse(chat_body(result))

    async def task_classify(model: str, body: dict) -> Response:
        """vLLM's two request forms: ``input`` (a string or list) or ``messages`` (chat)."""
        if "messages" in body and "input" not in body:
            texts, param = [_chat_text(body)], "messages"
        else:
            texts, param = _texts(body.get("input"), "input"), "input"
        return JSONResponse(classify_body(await run(model, texts, param, body)))

    async def completions(raw: Request) -> Response:
        return await dispatch(raw, "completions", task_completion, (vllm_completion, CompletionRequest))

    async def chat_completions(raw: Request) -> Response:
        return await dispatch(raw, "chat_completions", task_chat, (vllm_chat, ChatCompletionRequest))

    async def classify(raw: Request) -> Response:
        return await dispatch(raw, "classify", task_classify)

    async def models(raw: Request) -> Response:
        listing = (await raw.app.state.openai_serving_models.show_available_models()).model_dump()
        base = base_names[0]
        for name, info in sorted(service.catalog.items()):
            quality = service.quality(info)
            listing["data"].append({
                "id": name,
                "object": "model",
                "created": int(info.created_at.timestamp()),
                "owned_by": "ifedicl",
                "root": base,
                "parent": base,
                "max_model_len": service.max_model_len,
                "run_id": info.run_id,
                "labels": list(info.task.labels),
                "resident": service.tasks.is_resident(name),  # tables in the engine now (else: loaded on use)
                **(quality.to_dict() if quality is not None else {}),
            })  # fmt: skip
        if service.router is not None:
            listing["data"].append({
                "id": AUTO_MODEL, "object": "model", "created": int(time.time()), "owned_by": "ifedicl",
                "root": base, "parent": base, "max_model_len": service.max_model_len,
                "routes_to": sorted(service.catalog),
            })  # fmt: skip
        return JSONResponse(listing)

    async def prometheus_text(raw: Request) -> Response:
        """Always the text format 0.0.4: prometheus_client's OpenMetrics output (which Prometheus
        asks for first) rewrites ``vllm:x`` sample names to ``vllm_x``, which would empty every
        dashboard panel and alert on vLLM's metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    async def admin_reload(raw: Request) -> Response:
        report = await service.reload()
        status = 200 if not report.failed else 409  # 409: some published run was refused (or the store unread)
        return JSONResponse(report.to_dict(), status_code=status)

    before = {id(route) for route in app.router.routes}
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/classify", classify, methods=["POST"])
    app.add_api_route("/classify", classify, methods=["POST"])
    app.add_api_route("/admin/reload", admin_reload, methods=["POST"])
    app.add_api_route("/metrics", prometheus_text, methods=["GET"])
    ours = [route for route in app.router.routes if id(route) not in before]
    app.router.routes[:] = ours + [route for route in app.router.routes if id(route) in before]
    app.openapi_schema = None
