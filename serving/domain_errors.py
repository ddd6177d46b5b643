"""What the server refuses or fails at, said in its own terms: no HTTP here.

The service, the task cache and the request guard raise these; :mod:`ifedicl.serving.api` alone turns one
into an HTTP answer (its ``HTTP_ERRORS`` table: status, OpenAI error ``type``, headers). So the service can
be driven without a web framework (tests, benchmarks), and a status code is decided in one place.

Each carries the message the client reads and ``param``, the request field at fault (OpenAI's error
``param``; ``None`` when no one field is).
"""

from __future__ import annotations


class ServingError(Exception):
    """A request the server cannot answer as asked."""

    default_param: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param if param is not None else self.default_param


class BadRequest(ServingError):
    """The request itself is wrong: malformed JSON, a missing or ill-typed field, too many inputs, a prompt
    longer than the model's context, a field only the server may set."""


class Unauthenticated(ServingError):
    """No API key, or not one this server (or this admin path) accepts."""


class BodyTooLarge(ServingError):
    """The request body is over ``--max-body-bytes``."""


class Overloaded(ServingError):
    """The server works on as many requests as it takes (``--max-requests-in-flight``); retry shortly."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TaskNotFound(ServingError):
    """No served task (nor the base model, nor ``auto`` when it is on) has the requested name."""

    default_param = "model"


class TaskUnavailable(ServingError):
    """The task is served but cannot be scored now: its tables are unreadable for the moment, every task row
    is leased by in-flight requests, or (``model="auto"``) no task is served to route to. Retrying may work."""


class RunRefused(TaskUnavailable):
    """The task's published run can never be served here (another model, label words this tokenizer cannot
    score, rows gone, NaN tables): refused until another run of the task is published."""


class InternalError(ServingError):
    """A bug or an engine failure, not the request's fault (the engine returned no logprobs, an unexpected
    exception while classifying)."""
