"""Request errors and how they reach the client.

Every failure on the request path becomes a ``RequestError``: an HTTP status, GIE's error
code name (used as the ``error_code`` metric label) and a message. The handler turns it into
an ext_proc ImmediateResponse whose body is an OpenAI-style JSON error, so clients (OpenAI
SDKs) show a readable message instead of an opaque gateway failure.
"""

from __future__ import annotations

import orjson

# GIE's internal codes (pkg/common/error) and the HTTP status each maps to.
BAD_REQUEST = "BadRequest"
NOT_FOUND = "NotFound"
RESOURCE_EXHAUSTED = "ResourceExhausted"
INTERNAL = "Internal"
SERVICE_UNAVAILABLE = "ServiceUnavailable"
MODEL_SERVER_ERROR = "ModelServerError"

_STATUS = {
    BAD_REQUEST: 400,
    NOT_FOUND: 404,
    RESOURCE_EXHAUSTED: 429,
    INTERNAL: 500,
    SERVICE_UNAVAILABLE: 503,
}
_OPENAI_TYPE = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class RequestError(Exception):
    """A request the picker answers itself, with ``status`` and a JSON body."""

    __slots__ = ("code", "message", "status")

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or _STATUS.get(code, 500)

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": f"inference error: {self.code} - {self.message}",
                    "type": _OPENAI_TYPE.get(self.status, "server_error"),
                    "code": self.status,
                }
            }
        )

    def __repr__(self) -> str:
        return f"RequestError({self.status} {self.code}: {self.message})"


def bad_request(message: str) -> RequestError:
    return RequestError(BAD_REQUEST, message)


def too_large(message: str) -> RequestError:
    """413: the request body is over ``--max-request-body-bytes`` (a client error, so the
    GIE code stays BadRequest; the status tells clients that retrying as-is cannot work)."""
    return RequestError(BAD_REQUEST, message, status=413)


def shed(message: str) -> RequestError:
    return RequestError(RESOURCE_EXHAUSTED, message)


def unavailable(message: str) -> RequestError:
    return RequestError(SERVICE_UNAVAILABLE, message)
