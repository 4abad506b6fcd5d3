"""The search page at ``/`` and the two read-only routes it needs besides ``/v1/search``.

The page (``static/``: plain HTML, CSS and JavaScript, no build step, nothing from a CDN) sends queries to
``POST /v1/search`` like any client. ``GET /v1/budgets`` tells it the ladder budgets this model and index
allow, the bytes each reads and the model card's measured quality there; ``GET /v1/thumbnail?id=`` serves a
small PNG of an indexed item's image. A thumbnail is served only for an id the index holds, from the path
in its metadata, and only if that file lies under the server's ``--image-dir`` — the same rules (relative
path, symlinks resolved, size and pixel limits) as an image path in a request, so no other file is reachable.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from metaembed.auto_budget import AutoBudget
from metaembed.budget import Budget
from metaembed.serve.config import ServeConfig
from metaembed.serve.errors import NotFoundError, PermissionDeniedError
from metaembed.serve.inputs import decode_image, read_image_path

STATIC = Path(__file__).with_name("static")
MEDIA_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
THUMBNAIL_SIDE = 256
DEFAULT_BUDGET = Budget(4, 8)  # the page opens at the middle of the ladder: moving either way shows the trade


class BudgetInfo(BaseModel):
    budget: str
    index_bytes: int | None = Field(None, description="candidate-vector bytes one exhaustive search reads")
    quality: dict[str, float] = Field(default_factory=dict, description="the model card's measured quality")


class AutoPolicy(BaseModel):
    """The ``auto`` policy a search with ``budget: "auto"`` would use."""

    cheap: str
    ceiling: str
    steps: list[str] = Field(..., description="the budgets a query may visit, cheap first")
    threshold: float | None = Field(..., description="normalised margin below which a query escalates (null = inf)")
    top_m: int


class BudgetsResponse(BaseModel):
    object: str = "budgets"
    budgets: list[BudgetInfo]
    default: str
    model: str
    index_size: int | None
    thumbnails: bool = Field(..., description="whether /v1/thumbnail can serve images (needs --image-dir)")
    auto: AutoPolicy | None = Field(None, description="the policy of budget 'auto'; null where the server has none")


def page_router(
    index: Any,
    config: ServeConfig,
    *,
    n_query: int,
    n_candidate: int,
    quality: dict[str, dict[str, float]],
    auto_policy: Callable[[], AutoBudget | None] = lambda: None,
) -> APIRouter:
    """Routes of the page: ``/``, ``/static/*``, ``/v1/budgets`` and ``/v1/thumbnail``.

    ``auto_policy()`` is the policy ``budget: "auto"`` would use now (or None): the page offers auto only then."""
    router = APIRouter()
    shipped = {path.name: path for path in STATIC.iterdir() if path.suffix in MEDIA_TYPES}
    vectors = n_candidate if index is None else min(n_candidate, index.num_vectors)
    ladder = [b for b in Budget.LADDER if b.r_q <= n_query and b.r_c <= vectors] or [Budget(1, 1)]

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(shipped["index.html"], media_type="text/html")

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in shipped:  # only the files shipped with the package, by exact name
            raise NotFoundError(f"no static file {name!r}")
        return FileResponse(shipped[name], media_type=MEDIA_TYPES[shipped[name].suffix])

    @router.get("/v1/budgets", response_model=BudgetsResponse)
    def budgets() -> BudgetsResponse:
        """The ladder budgets this server can search at, the index bytes each reads and the model card's quality."""
        from metaembed.index.cost import search_bytes

        policy = auto_policy()
        return BudgetsResponse(
            budgets=[
                BudgetInfo(
                    budget=str(b),
                    index_bytes=None if index is None else search_bytes(index, b),
                    quality=quality.get(str(b), {}),
                )
                for b in ladder
            ],
            default=str(DEFAULT_BUDGET if DEFAULT_BUDGET in ladder else ladder[len(ladder) // 2]),
            model=config.model_name,
            index_size=None if index is None else len(index),
            thumbnails=index is not None and config.image_dir is not None,
            auto=None if policy is None else _auto_info(policy),
        )

    @router.get(
        "/v1/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 403: {"description": "image outside --image-dir"},
                   404: {"description": "unknown id, no image, or thumbnails off"}},
    )  # fmt: skip
    def thumbnail(item_id: str = Query(..., alias="id", min_length=1, max_length=1024)) -> Response:
        """A PNG of an indexed item's image, at most 256 px a side (needs ``--image-dir``)."""
        from metaembed.index.validate import check_ids

        if index is None or config.image_dir is None:
            raise NotFoundError("thumbnails are off: start the server with --index and --image-dir")
        _, (metadata,) = index.get(check_ids([item_id]))
        stored = metadata.get("path")
        if not stored or "image" not in str(metadata.get("kind", "image")):
            raise NotFoundError(f"item {item_id!r} has no image file", "id")
        path, root = Path(stored), config.image_dir.resolve()
        if path.is_absolute():
            if not path.is_relative_to(root):
                raise PermissionDeniedError(f"item {item_id!r}'s image is outside the server's image directory", "id")
            path = path.relative_to(root)
        image = decode_image(read_image_path(str(path), "id", config), "id", config)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return router


def _auto_info(policy: AutoBudget) -> AutoPolicy:
    return AutoPolicy(
        cheap=str(policy.cheap),
        ceiling=str(policy.ceiling),
        steps=[str(b) for b in policy.steps()],
        threshold=policy.threshold if policy.threshold != float("inf") else None,
        top_m=policy.top_m,
    )
