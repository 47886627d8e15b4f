"""GET /metrics (the Prometheus text format, behind the token like the API) and the middleware
that times every HTTP request by route template and status. The instruments live in
service.metrics; this module only reads requests and answers scrapes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import require_token, services
from service.api.schemas import errors
from service.metrics import UNMATCHED, Metrics

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_token)], responses=errors(401))


@router.get(
    "/metrics",
    summary="Prometheus metrics: queue, jobs, stages, models, inbox, HTTP, event clients",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(request: Request) -> Response:
    svc = services(request)
    counts = await svc.queue.counts()
    body = request.app.state.metrics.render(counts)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def route_of(scope: Scope, path: str) -> str:
    """The template of the route that answered `path` (`/v1/jobs/{job_id}`), never the raw
    path: a client that asks for a million paths adds no series."""
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    pattern = getattr(route, "path_regex", None)
    if not isinstance(template, str) or pattern is None:
        return UNMATCHED
    # A router included with a prefix may hand over its own route, which knows its path
    # without the prefix (FastAPI's lazy include): the prefix is the part of the path before
    # what the route matches. The router matched, so that part is one of the app's prefixes.
    for at, char in enumerate(path):
        if char == "/" and pattern.match(path[at:]):
            return path[:at] + template
    return template


class RequestMetrics:
    """Pure ASGI middleware: each HTTP request's seconds to its response headers, by method,
    route template and status. A streamed body (events, downloads) is not in the time: a
    stream's lifetime is not its latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status: int | None = None
        # Read before routing: a mount rewrites the scope's root_path as it hands over.
        root, path = scope.get("root_path", ""), scope["path"]
        path = path[len(root) :] if root and path.startswith(root) else path

        async def timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and status is None:
                status = int(message["status"])
                self._observe(scope, path, status, began)
            await send(message)

        try:
            await self.app(scope, receive, timed)
        except Exception:
            if status is None:  # the outermost handler answers it with a 500
                self._observe(scope, path, 500, began)
            raise

    def _observe(self, scope: Scope, path: str, status: int, began: float) -> None:
        seconds = time.perf_counter() - began
        self.metrics.observe_request(scope["method"], route_of(scope, path), status, seconds)
