"""ASGI middleware that acts around a route: admission control, the body limit, metrics, the last-resort answer.

**Admission.** Route handlers are plain ``def`` functions that FastAPI runs on a bounded thread pool; a request
that waits for a thread waits before any deadline starts, and a flood of slow requests (large encodes) can
hold every thread, so ``/health`` and keyed writes queue behind it. :class:`Admission` counts the requests in
progress per lane on the event loop, before a thread is taken or the body is read: a lane at its limit answers
503 with ``Retry-After`` at once. The lanes' limits add up to less than the thread pool, so a lane always finds
a thread: encode work (``/v1/embeddings``, ``/v1/search``), keyed index writes, and everything else
(``/health``, ``/metrics``, docs). Writes are checked for their API key here too, so requests without a valid
key never occupy the write lane.

**CatchAll.** Starlette's outermost error middleware answers an unhandled exception with a 500 and then
re-raises it to the server, which logs "Exception in ASGI application" and drops the keep-alive connection.
:class:`CatchAll` sits inside it and answers the exception itself (logged once, with its traceback), so
nothing escapes to the server.

**BodyLimit** refuses bodies over the limit before the app reads them; **RequestMetrics** counts and times every
answer by route and status. All four are plain ASGI classes: no extra task or stream per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from metaembed.serve.errors import OverloadedError, PayloadTooLargeError, RequestError
from metaembed.serve.metrics import Metrics
from metaembed.serve.responses import error_response, refusal

log = logging.getLogger(__name__)

ENCODE, WRITE, LIGHT = "encode", "write", "light"


class Admission:
    """Refuse a request with a fast 503 when its lane is full; refuse a write without a valid key with 401/403."""

    def __init__(
        self, app, *, limits: dict[str, int], lanes: dict[str, str], authorize: Callable[[str | None], None]
    ) -> None:
        self.app, self.limits, self.lanes, self.authorize = app, limits, lanes, authorize
        self.active = dict.fromkeys(limits, 0)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lane = self.lanes.get(scope["path"], LIGHT)
        if lane == WRITE:
            header = dict(scope.get("headers") or []).get(b"authorization")
            try:
                self.authorize(None if header is None else header.decode("latin-1"))
            except RequestError as error:
                return await refusal(error)(scope, receive, send)
        # The event loop runs one coroutine at a time: nothing can change the count between check and increment.
        if self.active[lane] >= self.limits[lane]:
            message = f"the server is busy ({self.active[lane]} {lane} requests in progress); retry shortly"
            response = error_response(503, message, OverloadedError.error_type, None, {"Retry-After": "1"})
            return await response(scope, receive, send)
        self.active[lane] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active[lane] -= 1


class CatchAll:
    """Answer any exception a request raises with a logged 500, so none reaches the server."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=error)
            if not started:  # once a response has started, the server can only close the connection
                response = error_response(500, "internal server error (logged on the server)", "server_error")
                await response(scope, receive, send)


class BodyLimit:
    """Refuse bodies over ``limit`` bytes (by Content-Length, and while streaming)."""

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


class RequestMetrics:
    """Count each request by route template and status, and observe its latency until the response started."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, latency = 500, None  # 500 unless an answer starts: the exception goes on to CatchAll

        async def recording_send(message):
            nonlocal status, latency
            if message["type"] == "http.response.start":
                status, latency = message["status"], time.perf_counter() - start
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # the router writes the matched route into this same scope; a request refused before routing has none
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start if latency is None else latency)
