"""The service's errors form one subtree of MetaEmbedError, importable without the web framework."""

from __future__ import annotations

import inspect
import subprocess
import sys

from metaembed.errors import InputError, MetaEmbedError
from metaembed.serve import errors


def test_every_serve_error_is_under_serve_error():
    classes = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if cls.__module__ == errors.__name__]
    assert {"ServeError", "ServeConfigError", "RequestError", "BadRequestError", "OverloadedError"} <= {
        cls.__name__ for cls in classes
    }
    assert all(issubclass(cls, errors.ServeError) and issubclass(cls, MetaEmbedError) for cls in classes)
    assert issubclass(errors.ServeConfigError, InputError)  # the CLI's usual one-line error, exit 2
    statuses = {cls.__name__: cls.status for cls in classes if issubclass(cls, errors.RequestError)}
    assert statuses["OverloadedError"] == 503 and statuses["EncodeTimeoutError"] == 504


def test_the_config_and_its_errors_import_without_the_web_framework():
    code = (
        "import sys; from metaembed.serve import ServeConfig; from metaembed.serve.errors import ServeError; "
        "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"
