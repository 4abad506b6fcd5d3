"""The API key: where it comes from, and a constant-time check of the bearer token."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from metaembed.serve.errors import AuthenticationError, PermissionDeniedError

API_KEY_ENV = "METAEMBED_API_KEY"
MIN_KEY_LENGTH = 16


def load_api_key(key_file: str | Path | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The key from ``--api-key-file`` (first line) or ``$METAEMBED_API_KEY``; ``None`` if neither is set."""
    from metaembed.errors import InputError

    environ = os.environ if environ is None else environ
    if key_file is not None:
        path = Path(key_file)
        try:
            key = path.read_text().strip()
        except OSError as error:
            raise InputError(f"cannot read the API key file {str(path)!r}: {error.strerror}") from error
        source = f"API key file {str(path)!r}"
    elif environ.get(API_KEY_ENV):
        key, source = environ[API_KEY_ENV].strip(), f"${API_KEY_ENV}"
    else:
        return None
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
        raise InputError(f"{source}: an API key must be at least {MIN_KEY_LENGTH} characters without whitespace")
    return key


def check_bearer(authorization: str | None, api_key: str | None) -> None:
    """Raise unless ``authorization`` is ``Bearer <api_key>``; the comparison takes constant time."""
    if api_key is None:
        raise PermissionDeniedError(
            "index writes are disabled: no API key is configured on the server "
            f"(set ${API_KEY_ENV} or start it with --api-key-file)"
        )
    if not authorization:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("malformed Authorization header: expected 'Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode("utf-8", "surrogatepass"), api_key.encode("utf-8")):
        raise AuthenticationError("wrong API key")
