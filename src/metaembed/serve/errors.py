"""Errors the service turns into HTTP responses; each knows its status code and OpenAI-style error type."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from starlette.responses import JSONResponse

from metaembed.errors import MetaEmbedError


class ErrorJSON(JSONResponse):
    """Error bodies are ASCII-escaped JSON, so even a message quoting broken Unicode renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, error_type: str, param: str | None = None, headers=None) -> ErrorJSON:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return ErrorJSON(body, status_code=status, headers=headers)


class ServeError(MetaEmbedError):
    """A request the service refuses; ``status`` and ``error_type`` go into the JSON error body."""

    status: ClassVar[int] = 400
    error_type: ClassVar[str] = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BadRequestError(ServeError, ValueError):
    """Malformed input: bad base64, not an image, text that is not valid Unicode, a path outside the image dir."""


class PayloadTooLargeError(ServeError):
    status = 413
    error_type = "payload_too_large"


class AuthenticationError(ServeError):
    status = 401
    error_type = "authentication_error"


class PermissionDeniedError(ServeError):
    status = 403
    error_type = "permission_denied"


class NotFoundError(ServeError):
    status = 404
    error_type = "not_found"


class OverloadedError(ServeError):
    status = 503
    error_type = "overloaded"


class EncodeTimeoutError(ServeError):
    status = 504
    error_type = "timeout"
