"""Errors the API answers with, in OpenAI's error format (as vLLM's own routes do)."""

from __future__ import annotations

from http import HTTPStatus

# vLLM's names for the error ``type`` field, so our errors look like its own.
_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "RequestEntityTooLargeError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
}


class ApiError(Exception):
    """A request the server refuses; carries the HTTP status and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param

    def body(self) -> dict:
        kind = _TYPES.get(HTTPStatus(self.status), "BadRequestError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, param)


def not_found(message: str, param: str | None = "model") -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, message, param)


def unauthorized(message: str = "Invalid or missing API key: send 'Authorization: Bearer <key>'") -> ApiError:
    return ApiError(HTTPStatus.UNAUTHORIZED, message)


def too_large(message: str) -> ApiError:
    return ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)
