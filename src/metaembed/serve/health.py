"""``GET /health`` and ``GET /metrics``.

``/health`` is an ``async`` route: it is answered on the event loop, without a worker thread, the model or the
index's lock, so it stays fast while encode work fills the thread pool and the CPU. Everything it reports is
already in memory (the item count is the one :meth:`Service.counted` keeps).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from metaembed.serve import schemas
from metaembed.serve.service import Service


def health_router(service: Service) -> APIRouter:
    router = APIRouter()
    config = service.config

    @router.get("/health", response_model=schemas.HealthResponse)
    async def health() -> schemas.HealthResponse:
        """Liveness and what is being served."""
        return schemas.HealthResponse(
            status="ok",
            model=config.model_name,
            dim=service.dim,
            num_query_vectors=service.n_query,
            num_candidate_vectors=service.n_candidate,
            index_size=service.counted(),
            queue_depth=service.batcher.depth,
            index_writes_enabled=service.writes_enabled,
        )

    @router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def prometheus() -> Response:
        """Prometheus metrics: requests by route and status, latencies, encode batch sizes, queue depth."""
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return router
