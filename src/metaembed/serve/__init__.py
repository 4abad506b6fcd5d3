"""The HTTP service: OpenAI-style ``/v1/embeddings``, budgeted ``/v1/search`` and an API-key-guarded index.

Build an app with :func:`create_app` (a loaded model, an index, a :class:`ServeConfig`) or start one from
the command line with ``metaembed serve --model M --index I``. See docs/serve.md.
"""

from __future__ import annotations

from metaembed.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(*args, **kwargs):
    """See :func:`metaembed.serve.app.create_app` (imported lazily: FastAPI is an optional extra)."""
    from metaembed.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
