"""OpenAI's error envelope as a response: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from metaembed.serve.errors import RequestError


class ErrorJSON(JSONResponse):
    """Error bodies are ASCII-escaped JSON, so even a message quoting broken Unicode renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, error_type: str, param: str | None = None, headers=None) -> ErrorJSON:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return ErrorJSON(body, status_code=status, headers=headers)


def refusal(error: RequestError) -> ErrorJSON:
    """The answer to a refused request: its status and type, plus the header a 401 or 503 client needs."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status == 503:
        headers = {"Retry-After": "1"}
    return error_response(error.status, str(error), error.error_type, error.param, headers)
