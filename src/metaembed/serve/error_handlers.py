"""How an exception a route raises becomes an answer in OpenAI's error envelope.

Anything a request can cause is a 4xx. A failure of the server's own files or storage is a 503 or 507 whose
body says what happened without internals: the details (which file, which errno) go to the server log, and no
body names a server path.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from metaembed.errors import BudgetError, MetaEmbedError
from metaembed.serve.errors import RequestError
from metaembed.serve.responses import error_response, refusal

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI, index: Any) -> None:
    """Register the handlers on ``app``; ``index`` (or ``None``) is the one whose path bodies must not show."""

    @app.exception_handler(RequestError)
    async def serve_error(request: Request, error: RequestError):
        return refusal(error)

    @app.exception_handler(MetaEmbedError)
    async def metaembed_error(request: Request, error: MetaEmbedError):
        status, error_type, param = classify(error)
        message = str(error)
        if status >= 500:
            log.error("index or model error on %s %s: %s", request.method, request.url.path, error)
            message = public_message(error)
        elif index is not None and getattr(index, "path", None) is not None:
            message = message.replace(str(index.path), "<index>")  # bodies never show where the server keeps it
        return error_response(status, message, error_type, param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = []
        for problem in error.errors()[:10]:
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {problem.get('msg', 'invalid')}")
        return error_response(422, "invalid request: " + "; ".join(problems), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), "invalid_request_error", headers=error.headers)


def classify(error: MetaEmbedError) -> tuple[int, str, str | None]:
    """HTTP status, error type and param for an error raised by the model or the index."""
    from metaembed.index import base

    # the server's own files, locks or disk, not the request
    unavailable = (
        base.IndexFormatError,
        base.IndexNotFoundError,
        base.IndexExistsError,
        base.IndexLockedError,
        base.ReadOnlyIndexError,
        base.IndexStorageError,
    )
    if isinstance(error, base.UnknownIdError):
        return 404, "not_found", "ids"
    if isinstance(error, base.DuplicateIdError):
        return 409, "conflict", "ids"
    if isinstance(error, BudgetError):
        return 400, "invalid_request_error", "budget"
    if isinstance(error, base.IndexStorageError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507, "insufficient_storage", None
    if isinstance(error, unavailable):
        return 503, "index_unavailable", None
    return 400, "invalid_request_error", None


def public_message(error: MetaEmbedError) -> str:
    """What a client may read about a server-side failure: what happened, never where (paths stay in the log)."""
    from metaembed.index.base import IndexFormatError, IndexLockedError, IndexStorageError, ReadOnlyIndexError

    if isinstance(error, IndexFormatError):
        return "the index's files are damaged or changed under the server; the server log names the file"
    if isinstance(error, IndexStorageError):
        reason = os.strerror(error.errno) if error.errno else "an I/O error"
        return f"the index's storage failed ({reason}); nothing was written by this request"
    if isinstance(error, ReadOnlyIndexError):
        return "the index is read-only on this server"
    if isinstance(error, IndexLockedError):
        return "the index is held by another writer process; retry later"
    return "internal server error (logged on the server)"
