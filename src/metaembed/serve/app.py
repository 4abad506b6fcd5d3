"""The FastAPI application: one :class:`~metaembed.serve.service.Service`, the middleware, the routers.

Every handler but ``/health`` is a plain ``def`` (FastAPI runs it in a worker thread), parses and checks its
input, hands encode work to the :class:`~metaembed.serve.batcher.EncodeBatcher` and waits for it with a
deadline. Requests are admitted per lane before they take a thread (:mod:`metaembed.serve.middleware`).
Errors use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``
(:mod:`metaembed.serve.error_handlers`).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

from metaembed.serve.config import ServeConfig
from metaembed.serve.embeddings import embeddings_router
from metaembed.serve.error_handlers import install_error_handlers
from metaembed.serve.health import health_router
from metaembed.serve.metrics import Metrics
from metaembed.serve.middleware import ENCODE, LIGHT, WRITE, Admission, BodyLimit, CatchAll, RequestMetrics
from metaembed.serve.page import page_router
from metaembed.serve.search import search_router
from metaembed.serve.security import check_bearer
from metaembed.serve.service import Service
from metaembed.serve.writes import writes_router


def create_app(
    model,
    index=None,
    config: ServeConfig | None = None,
    *,
    quality: dict[str, dict[str, float]] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """A FastAPI app serving ``model`` (a MetaEmbedModel) and ``index`` (an index, or ``None`` for none).

    The app owns an encode worker thread, started now and stopped when the app shuts down. ``quality`` (the
    model card's table, :func:`metaembed.model.card.read_quality`) is shown per budget on the search page.
    ``model_dir`` (the folder the model was loaded from) is where ``budget: "auto"`` finds its policy when the
    index has none beside it.
    """
    config = config or ServeConfig()
    model.eval()
    metrics = Metrics()
    service = Service(model, index, config, metrics, model_dir=model_dir)
    metrics.queue_depth.set_function(lambda: service.batcher.depth)
    if index is not None:
        metrics.index_items.set_function(lambda: len(index))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import anyio.to_thread

        # every admission lane below its limit finds a thread at once (plus a margin for FastAPI's own work)
        anyio.to_thread.current_default_thread_limiter().total_tokens = config.thread_limit
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="metaembed",
        version=_version(),
        summary="MetaEmbed multi-vector embeddings and budgeted MaxSim search",
        description=(
            "OpenAI-style `/v1/embeddings` returning r × D multi-vector embeddings, `/v1/search` over the "
            "index at a per-request budget `R_QxR_C`, and API-key-guarded index writes."
        ),
        lifespan=lifespan,
    )
    app.state.batcher, app.state.config, app.state.index, app.state.metrics = service.batcher, config, index, metrics
    app.state.service = service
    # Added innermost first: CatchAll wraps the metrics, which see admission's 503s, which come before the body is read.
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(
        Admission,
        limits={ENCODE: config.max_encode_requests, WRITE: config.max_write_requests, LIGHT: config.max_light_requests},
        lanes={"/v1/embeddings": ENCODE, "/v1/search": ENCODE, "/v1/index/add": WRITE, "/v1/index/delete": WRITE},
        authorize=lambda header: check_bearer(header, config.api_key),
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(CatchAll)  # outermost of ours: inside it every exception becomes an answer
    install_error_handlers(app, index)

    for router in (embeddings_router, search_router, writes_router, health_router):
        app.include_router(router(service))
    app.include_router(
        page_router(
            index,
            config,
            n_query=service.n_query,
            n_candidate=service.n_candidate,
            quality=quality or {},
            auto_policy=service.auto_policy_or_none,
        )
    )
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metaembed")
    except PackageNotFoundError:
        return "0.0.0"
