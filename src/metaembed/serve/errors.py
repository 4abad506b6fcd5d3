"""The service's errors: a subtree of :class:`~metaembed.errors.MetaEmbedError` rooted at :class:`ServeError`.

A refused request is a :class:`RequestError` that knows its HTTP status and OpenAI-style error type
(:func:`metaembed.serve.responses.refusal` turns it into the answer); a limit or knob out of range is a
:class:`ServeConfigError`, raised before the service starts. Pure exceptions: importing them needs no web framework.
"""

from __future__ import annotations

from typing import ClassVar

from metaembed.errors import InputError, MetaEmbedError


class ServeError(MetaEmbedError):
    """Base of every error the service raises on purpose (``except ServeError`` catches them all)."""


class ServeConfigError(ServeError, InputError):
    """A limit or knob of ``ServeConfig`` out of range; ``field`` names it so the CLI can name its flag."""

    def __init__(self, field: str, requirement: str, value: object) -> None:
        super().__init__(f"{field} {requirement}, got {value!r}")
        self.field, self.requirement, self.value = field, requirement, value


class RequestError(ServeError):
    """A request the service refuses; ``status`` and ``error_type`` go into the JSON error body."""

    status: ClassVar[int] = 400
    error_type: ClassVar[str] = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BadRequestError(RequestError, ValueError):
    """Malformed input: bad base64, not an image, text that is not valid Unicode, a path outside the image dir."""


class PayloadTooLargeError(RequestError):
    status = 413
    error_type = "payload_too_large"


class AuthenticationError(RequestError):
    status = 401
    error_type = "authentication_error"


class PermissionDeniedError(RequestError):
    status = 403
    error_type = "permission_denied"


class NotFoundError(RequestError):
    status = 404
    error_type = "not_found"


class OverloadedError(RequestError):
    status = 503
    error_type = "overloaded"


class PolicyUnavailableError(RequestError):
    """The server's stored auto-budget policy exists but cannot be read or does not fit its model."""

    status = 503
    error_type = "policy_unavailable"


class EncodeTimeoutError(RequestError):
    status = 504
    error_type = "timeout"
