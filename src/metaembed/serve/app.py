"""The FastAPI application: routes, error envelope, body limit, admission control, metrics.

Every handler is a plain ``def`` (FastAPI runs it in a worker thread), parses and checks its input,
hands encode work to the :class:`~metaembed.serve.batcher.EncodeBatcher` and waits for it with a
deadline. Requests are admitted per lane before they take a thread (:mod:`metaembed.serve.middleware`).
Errors use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``; anything a request can
cause is a 4xx, and a server-side failure is logged with its details while the body says what happened
without internals (no server paths, no tracebacks).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from metaembed.auto_budget import AutoBudget, is_auto
from metaembed.budget import Budget
from metaembed.errors import BudgetError, MetaEmbedError
from metaembed.index.adaptive import resolve_policy
from metaembed.index.cost import search_bytes
from metaembed.model.items import Item
from metaembed.serve import schemas
from metaembed.serve.batcher import EncodeBatcher, Encoded
from metaembed.serve.config import ServeConfig
from metaembed.serve.errors import (
    BadRequestError,
    EncodeTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServeError,
    error_response,
)
from metaembed.serve.inputs import check_text, to_item
from metaembed.serve.metrics import Metrics
from metaembed.serve.middleware import ENCODE, LIGHT, WRITE, Admission, CatchAll
from metaembed.serve.page import page_router
from metaembed.serve.security import check_bearer

log = logging.getLogger(__name__)

BASE64_DTYPES = {"base64": ("float32", "<f4"), "base64_float16": ("float16", "<f2")}
MAX_ID_CHARS = 512
MAX_METADATA_DEPTH = 32  # nesting levels of one metadata object (responses must serialise it back)
MAX_METADATA_BYTES = 65_536  # one metadata object as JSON
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in {
        400: "bad input (what was wrong is in error.message)",
        413: "request, item or image too large",
        422: "request body does not match the schema",
        503: "encode queue full",
        504: "encode did not finish in time",
    }.items()
}


def _responses(**extra: str) -> dict[int | str, dict[str, Any]]:
    codes = {int(code.lstrip("_")): text for code, text in extra.items()}
    return {**ERROR_RESPONSES, **{c: {"model": schemas.ErrorResponse, "description": t} for c, t in codes.items()}}


SEARCH_RESPONSES = _responses(_404="no index configured")
AUTH = {"_401": "missing or wrong API key", "_403": "index writes disabled (no API key configured)"}
ADD_RESPONSES = _responses(**AUTH, _404="no index configured", _409="ids already in the index (use upsert)")
DELETE_RESPONSES = _responses(**AUTH, _404="unknown ids (nothing deleted), or no index configured")
BEARER = HTTPBearer(auto_error=False, description="the server's API key (METAEMBED_API_KEY or --api-key-file)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


class _RWLock:
    """Many concurrent searches, one writer at a time (writers wait for running searches).

    A waiting writer holds back new searches, so a steady stream of searches cannot starve an index write.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    def read(self):
        return _Held(self, write=False)

    def write(self):
        return _Held(self, write=True)


class _Held:
    def __init__(self, lock: _RWLock, write: bool) -> None:
        self.lock, self.write = lock, write

    def __enter__(self) -> None:
        with self.lock._cond:
            if self.write:
                self.lock._writers_waiting += 1
                self.lock._cond.wait_for(lambda: not self.lock._writing and self.lock._readers == 0)
                self.lock._writers_waiting -= 1
                self.lock._writing = True
            else:
                self.lock._cond.wait_for(lambda: not self.lock._writing and self.lock._writers_waiting == 0)
                self.lock._readers += 1

    def __exit__(self, *exc) -> None:
        with self.lock._cond:
            if self.write:
                self.lock._writing = False
            else:
                self.lock._readers -= 1
            self.lock._cond.notify_all()


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (by Content-Length, and while streaming)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = error_response(
            413, f"request body exceeds {self.limit:,} bytes", PayloadTooLargeError.error_type, "body"
        )
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await error_response(400, "invalid Content-Length header", "invalid_request_error")(
                    scope, receive, send
                )
            if declared > self.limit:
                return await too_large(scope, receive, send)
        # Read the whole body here (at most ``limit`` bytes), then replay it: a chunked upload without
        # Content-Length is cut off as soon as it passes the limit, and the app never sees it.
        messages, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                messages.append(message)
                break
            received += len(message.get("body", b""))
            if received > self.limit:
                return await too_large(scope, receive, send)
            messages.append(message)
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replay_receive():
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        await self.app(scope, replay_receive, send)


def create_app(
    model, index=None, config: ServeConfig | None = None, *, quality: dict[str, dict[str, float]] | None = None
) -> FastAPI:
    """A FastAPI app serving ``model`` (a MetaEmbedModel) and ``index`` (an index, or ``None`` for none).

    The app owns an encode worker thread, started now and stopped when the app shuts down. ``quality`` (the
    model card's table, :func:`metaembed.model.card.read_quality`) is shown per budget on the search page.
    """
    config = config or ServeConfig()
    model.eval()
    metrics = Metrics()
    batcher = EncodeBatcher(
        model,
        batching=config.batching,
        max_batch_items=config.max_batch_items,
        max_batch_wait_ms=config.max_batch_wait_ms,
        queue_size=config.queue_size,
        # half the timeout: the estimate leaves out the batch in progress and the request's own encode
        max_wait_s=config.request_timeout_s / 2,
        on_batch=metrics.observe_batch,
    )
    index_lock = _RWLock()
    two_stage_lock = threading.Lock()
    n_query, n_candidate, dim = model.num_vectors("query"), model.num_vectors("candidate"), model.embedding_dim
    metrics.queue_depth.set_function(lambda: batcher.depth)
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
            batcher.close()
            closer = getattr(index, "close", None)
            if callable(closer):
                closer()

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
    app.state.batcher, app.state.config, app.state.index, app.state.metrics = batcher, config, index, metrics
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(
        Admission,
        limits={ENCODE: config.max_encode_requests, WRITE: config.max_write_requests, LIGHT: config.max_light_requests},
        lanes={"/v1/embeddings": ENCODE, "/v1/search": ENCODE, "/v1/index/add": WRITE, "/v1/index/delete": WRITE},
        authorize=lambda header: check_bearer(header, config.api_key),
    )

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.requests.labels(path, str(status)).inc()
            metrics.latency.labels(path).observe(time.perf_counter() - start)

    app.add_middleware(CatchAll)  # outermost of ours: inside it every exception becomes an answer

    # -------------------------------------------------------------------------------- errors
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        if error.status == 503:
            headers = {"Retry-After": "1"}
        return error_response(error.status, str(error), error.error_type, error.param, headers)

    @app.exception_handler(MetaEmbedError)
    async def metaembed_error(request: Request, error: MetaEmbedError):
        status, error_type, param = _classify(error)
        message = str(error)
        if status >= 500:
            log.error("index or model error on %s %s: %s", request.method, request.url.path, error)
            message = _public_message(error)
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

    # ------------------------------------------------------------------------------- helpers
    def parse_items(values: Sequence[str | schemas.InputItem], what: str) -> list[Item]:
        if len(values) > config.max_items:
            raise PayloadTooLargeError(f"{len(values)} {what}; at most {config.max_items} per request", what)
        items = []
        for i, value in enumerate(values):
            where = f"{what}[{i}]"
            if isinstance(value, str):
                items.append(to_item(value, None, where, config))
            else:
                items.append(to_item(value.text, value.image, where, config))
        return items

    def encode(items: list[Item], side: str, *, urgent: bool = False) -> Encoded:
        future = batcher.submit(items, side, urgent=urgent)
        try:
            return future.result(timeout=config.request_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise EncodeTimeoutError(
                f"encoding did not finish within {config.request_timeout_s:g} s (server busy); retry later"
            ) from None

    def require_index():
        if index is None:
            raise NotFoundError("this server has no index (start it with --index PATH)")
        return index

    def require_writable_index():
        store = require_index()
        if getattr(store, "read_only", False):
            raise PermissionDeniedError("index writes are disabled: this server serves its index read-only")
        return store

    # ------------------------------------------------------------------------------- routes
    @app.post("/v1/embeddings", response_model=schemas.EmbeddingsResponse, responses=ERROR_RESPONSES)
    def embeddings(body: schemas.EmbeddingsRequest) -> schemas.EmbeddingsResponse:
        """Multi-vector embeddings in the OpenAI envelope: each item's ``embedding`` is r × D."""
        side = "query" if body.input_type == "query" else "candidate"
        keep = _side_vectors(body.budget, side, n_query, n_candidate)
        if body.dimensions is not None and body.dimensions != dim:
            raise BadRequestError(f"dimensions={body.dimensions}: this model has {dim} dimensions", "dimensions")
        values = body.input if isinstance(body.input, list) else [body.input]
        if not values:
            raise BadRequestError("input is an empty list; send at least one item", "input")
        encoded = encode(parse_items(values, "input"), side)
        data = []
        for i, vectors in enumerate(encoded.embeddings[:, :keep]):
            if body.encoding_format in BASE64_DTYPES:
                # what OpenAI clients decode: the r × D matrix flattened row by row, little-endian (float32 unless
                # float16 was asked for by name); the shape is in its own field
                dtype, numpy_dtype = BASE64_DTYPES[body.encoding_format]
                embedding: Any = base64.b64encode(vectors.numpy().astype(numpy_dtype).tobytes()).decode("ascii")
            else:
                embedding, dtype = vectors.tolist(), "float32"
            data.append(schemas.EmbeddingObject(index=i, embedding=embedding, shape=[keep, dim], dtype=dtype))
        tokens = sum(encoded.tokens)
        return schemas.EmbeddingsResponse(
            data=data,
            model=config.model_name,
            usage=schemas.Usage(prompt_tokens=tokens, total_tokens=tokens),
            input_type=body.input_type,
            num_vectors=keep,
        )

    @app.post("/v1/search", response_model=schemas.SearchResponse, responses=SEARCH_RESPONSES)
    def search(body: schemas.SearchRequest) -> schemas.SearchResponse:
        """Encode the query, score it against the index at ``budget`` with MaxSim, return the top ``k``."""
        start = time.perf_counter()
        store = require_index()
        auto = resolve_policy(store, body.budget) if is_auto(body.budget) else None
        budget = auto.validate(n_query, n_candidate).ceiling if auto else _budget(body.budget, n_query, n_candidate)
        if body.k > config.max_k:
            raise BadRequestError(f"k={body.k}: at most {config.max_k}", "k")
        items = parse_items([body.query], "query")
        encoded = encode(items, "query")
        encoded_at = time.perf_counter()
        queries = encoded.embeddings[:, : budget.r_q]
        # Two-stage search builds / extends the in-memory ANN graph on demand: one at a time.
        with index_lock.read(), two_stage_lock if body.two_stage else contextlib.nullcontext():
            found, results = _search(store, queries, auto or budget, body.k, body.two_stage)
        done = time.perf_counter()
        read = results.bytes_read[0] if auto else search_bytes(store, budget, two_stage=body.two_stage, k=body.k)
        return schemas.SearchResponse(
            results=found,
            budget=results.budgets[0] if auto else str(budget),
            k=body.k,
            two_stage=body.two_stage,
            model=config.model_name,
            index_bytes_read=read,
            auto=schemas.AutoBudgetInfo.of(auto, results.escalations[0]) if auto else None,
            timings=schemas.Timings(
                encode_ms=(encoded_at - start) * 1000,
                score_ms=(done - encoded_at) * 1000,
                total_ms=(done - start) * 1000,
            ),
        )

    @app.post("/v1/index/add", response_model=schemas.AddResponse, responses=ADD_RESPONSES)
    def index_add(body: schemas.AddRequest, credentials: Credentials) -> schemas.AddResponse:
        """Encode items as candidates and add them under ``ids`` (``upsert`` replaces existing ids). Needs the key."""
        _authorize(credentials, config.api_key)
        store = require_writable_index()
        if len(body.ids) != len(body.items):
            raise BadRequestError(f"{len(body.items)} items but {len(body.ids)} ids; send one id per item", "ids")
        if body.metadata is not None and len(body.metadata) != len(body.items):
            raise BadRequestError(
                f"{len(body.items)} items but {len(body.metadata)} metadata entries; send one per item (or null)",
                "metadata",
            )
        ids = _check_ids(body.ids)
        metadata = _check_metadata(body.metadata)
        embeddings = encode(parse_items(body.items, "items"), "candidate", urgent=True).embeddings
        with index_lock.write():
            if body.upsert:
                store.upsert(ids, embeddings, metadata=metadata)
            else:
                store.add(ids, embeddings, metadata=metadata)
            size = len(store)
        return schemas.AddResponse(added=len(ids), ids=ids, index_size=size)

    @app.post("/v1/index/delete", response_model=schemas.DeleteResponse, responses=DELETE_RESPONSES)
    def index_delete(body: schemas.DeleteRequest, credentials: Credentials) -> schemas.DeleteResponse:
        """Delete items by id; unknown ids are refused (404) and nothing is deleted. Needs the key."""
        _authorize(credentials, config.api_key)
        store = require_writable_index()
        ids = _check_ids(body.ids)
        with index_lock.write():
            store.delete(ids)
            size = len(store)
        return schemas.DeleteResponse(deleted=len(ids), index_size=size)

    @app.get("/health", response_model=schemas.HealthResponse)
    def health() -> schemas.HealthResponse:
        """Liveness and what is being served."""
        return schemas.HealthResponse(
            status="ok",
            model=config.model_name,
            dim=dim,
            num_query_vectors=n_query,
            num_candidate_vectors=n_candidate,
            index_size=None if index is None else len(index),
            queue_depth=batcher.depth,
            index_writes_enabled=config.api_key is not None
            and index is not None
            and not getattr(index, "read_only", False),
        )

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def prometheus() -> Response:
        """Prometheus metrics: requests by route and status, latencies, encode batch sizes, queue depth."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(page_router(index, config, n_query=n_query, n_candidate=n_candidate, quality=quality or {}))
    return app


# ---------------------------------------------------------------------------------------------- helpers
def _authorize(credentials, api_key: str | None) -> None:
    header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
    check_bearer(header, api_key)


def _budget(spec, n_query: int, n_candidate: int) -> Budget:
    if spec is None:
        return Budget(n_query, n_candidate)
    return Budget.parse(spec).validate(n_query, n_candidate)  # the int N is NxN, as everywhere


def _side_vectors(spec, side: str, n_query: int, n_candidate: int) -> int:
    available = n_query if side == "query" else n_candidate
    if spec is None:
        return available
    if isinstance(spec, int):
        if not 1 <= spec <= available:
            raise BudgetError(f"budget {spec}: a {side} has {available} vectors; allowed 1 ≤ budget ≤ {available}")
        return spec
    budget = Budget.parse(spec).validate(n_query, n_candidate)
    return budget.r_q if side == "query" else budget.r_c


def _check_ids(ids: list[str]) -> list[str]:
    for i, item_id in enumerate(ids):
        if not item_id or len(item_id) > MAX_ID_CHARS:
            raise BadRequestError(f"ids[{i}]: an id has 1 to {MAX_ID_CHARS} characters", "ids")
        check_text(item_id, f"ids[{i}]", MAX_ID_CHARS)
    if len(set(ids)) != len(ids):
        seen, duplicates = set(), []
        for item_id in ids:
            if item_id in seen:
                duplicates.append(item_id)
            seen.add(item_id)
        raise BadRequestError(f"duplicate ids in one request: {duplicates[:5]!r}", "ids")
    return list(ids)


def _check_metadata(metadata: list[dict | None] | None) -> list[dict | None] | None:
    if metadata is None:
        return None
    for i, entry in enumerate(metadata):
        if entry is None:
            continue
        depth = _depth(entry)
        if depth > MAX_METADATA_DEPTH:
            raise BadRequestError(
                f"metadata[{i}] is nested {depth} levels deep; at most {MAX_METADATA_DEPTH}", "metadata"
            )
        try:
            size = len(json.dumps(entry, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        except (ValueError, TypeError, UnicodeEncodeError) as error:
            raise BadRequestError(
                f"metadata[{i}] is not storable JSON (no NaN/Infinity, valid Unicode only): {error}", "metadata"
            ) from None
        if size > MAX_METADATA_BYTES:
            raise PayloadTooLargeError(
                f"metadata[{i}] is {size:,} bytes as JSON; at most {MAX_METADATA_BYTES:,}", "metadata"
            )
    return metadata


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _classify(error: MetaEmbedError) -> tuple[int, str, str | None]:
    """HTTP status, error type and param for an error raised by the model or the index."""
    from metaembed.index.base import DuplicateIdError, IndexError_, IndexFormatError, IndexStorageError, UnknownIdError

    if isinstance(error, UnknownIdError):
        return 404, "not_found", "ids"
    if isinstance(error, DuplicateIdError):
        return 409, "conflict", "ids"
    if isinstance(error, BudgetError):
        return 400, "invalid_request_error", "budget"
    if isinstance(error, IndexStorageError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507, "insufficient_storage", None
    if isinstance(error, IndexFormatError) or (isinstance(error, IndexError_) and not isinstance(error, ValueError)):
        return 503, "index_unavailable", None  # the server's own files or locks, not the request
    return 400, "invalid_request_error", None


def _public_message(error: MetaEmbedError) -> str:
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


def _search(store, queries, budget: Budget | AutoBudget, k: int, two_stage: bool):
    """The hits of the one query, and the index's results (an auto search's say what it cost)."""
    try:
        results = store.search(queries, budget, k, two_stage=two_stage)
    except ModuleNotFoundError as error:
        if two_stage and "two_stage" in str(error):
            raise BadRequestError("two-stage search is not available in this build; use two_stage=false") from None
        raise
    ids = results.ids[0] if results.ids else []
    scores = results.scores[0].tolist() if len(results.ids) else []
    metadata = results.metadata[0] if results.metadata else [None] * len(ids)
    hits = [
        schemas.SearchHit(id=str(item_id), score=float(score), metadata=meta or None)
        for item_id, score, meta in zip(ids, scores, metadata, strict=True)
        if math.isfinite(score)
    ]
    return hits, results


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metaembed")
    except PackageNotFoundError:
        return "0.0.0"
