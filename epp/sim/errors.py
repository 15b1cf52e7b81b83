"""OpenAI-shaped error bodies, as vLLM's OpenAI server returns them, and injectable failures.

Clients (and the picker's response handling) branch on the status and on ``error.type``; the
sim must produce the same shapes a real vLLM does so those branches are exercised in tests.
"""

from __future__ import annotations

import orjson

# HTTP status -> the exception-class name vLLM reports in error.type.
_TYPE_BY_STATUS: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}

# Failure types accepted by --failure-types (names as in llm-d-inference-sim) -> (status, message).
FAILURE_TYPES: dict[str, tuple[int, str]] = {
    "rate_limit": (429, "Rate limit reached for the simulated model"),
    "invalid_api_key": (401, "Incorrect API key provided"),
    "context_length": (400, "This model's maximum context length is exceeded"),
    "server_error": (500, "Internal server error (injected by the simulator)"),
    "invalid_request": (400, "Invalid request (injected by the simulator)"),
    "model_not_found": (404, "The model does not exist (injected by the simulator)"),
}


def error_type(status: int) -> str:
    """The ``error.type`` string vLLM uses for a status (generic names for unlisted ones)."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "BadRequestError" if 400 <= status < 500 else "InternalServerError"


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` serialized with orjson; ``type_``
    overrides the status's usual type (vLLM's admin routes report e.g. ``InvalidUserInput``)."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_ or error_type(status), "param": param, "code": status}}
    )


def missing_field_body(field: str, body: dict[str, object]) -> bytes:
    """vLLM's 400 for a request body lacking a required field (FastAPI validation, as vLLM
    0.32 words it)."""
    message = (f"1 validation error:\n  {{'type': 'missing', 'loc': 'body.{field}', 'msg': 'Field required', "
               f"'input': '<dict of {len(body)} items>'}}")
    return error_body(400, message, f"body.{field}", "Bad Request")
