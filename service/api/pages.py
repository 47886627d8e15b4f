"""The dashboard's HTML routes and its /static assets, shipped in the package: one page shell
whose JavaScript modules read everything through the public /v1 API. It knows no job, model or
token: a page never knows more than the API does. The browser guard (Host, Origin) runs before
these routes like any other; every answer here forbids content from any other origin. A page a
browser asks for that does not exist gets the shell with a 404 (the modules draw "not found");
an API client's miss stays a JSON 404."""

from __future__ import annotations

import inspect
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

WEB = Path(__file__).resolve().parent.parent / "web"
# Only this service's own scripts, styles and API; images also from blob: (an image fetched
# with the token, a mask drawn in the page). No inline script, no other origin, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
# The page that shows a flight report fetched with the token: the report is one file whose
# styles are inline, so that page alone allows inline styles (never scripts).
REPORT_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'"),
}
PAGES = ("/", "/submit", "/models", "/inbox", "/stats", "/map", "/flights", "/nodes")
# Misses under these are an API's, whatever the client accepts: they answer JSON.
NOT_PAGES = ("/v1", "/static", "/metrics", "/docs", "/openapi.json")

router = APIRouter(include_in_schema=False)


def shell(status_code: int = 200, headers: dict[str, str] = HEADERS) -> HTMLResponse:
    """The one HTML document; the path tells the modules which page to draw."""
    text = (WEB / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(text, status_code=status_code, headers=headers)


def wants_page(request: Request) -> bool:
    """A browser navigating to a path of the dashboard's, not a program calling the API."""
    path = request.url.path
    if request.method not in ("GET", "HEAD"):
        return False
    if any(path == prefix or path.startswith(prefix + "/") for prefix in NOT_PAGES):
        return False
    return "text/html" in request.headers.get("accept", "")


async def _page() -> HTMLResponse:
    return shell()


for _path in PAGES:
    router.add_api_route(_path, _page, methods=["GET"], response_class=HTMLResponse)


# Any segment: the page itself says "not a job id" or "no such job", never a JSON refusal.
@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(job_id: str) -> HTMLResponse:
    return shell()


# A flight's id may hold slashes (an inbox folder's): the page asks the API whether it exists.
@router.get("/flights/{name:path}", response_class=HTMLResponse)
async def flight_page(name: str) -> HTMLResponse:
    return shell()


@router.get("/reports/{name:path}", response_class=HTMLResponse)
async def report_page(name: str) -> HTMLResponse:
    return shell(headers=REPORT_HEADERS)


class Assets(StaticFiles):
    """StaticFiles with the dashboard's headers on every answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await super().__call__(scope, receive, with_headers)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", Assets(directory=WEB / "static"), name="static")
    # Installed after the app's own handlers: a 404 that is not a page's goes to theirs.
    api_miss = app.exception_handlers.get(HTTPException, http_exception_handler)

    async def not_found(request: Request, exc: Exception) -> Response:
        if wants_page(request):
            return shell(status_code=404)
        answer = api_miss(request, exc)
        response = await answer if inspect.isawaitable(answer) else answer
        if request.url.path.startswith("/static/"):  # an asset's miss, like its hits
            response.headers.update(HEADERS)
        return response

    app.add_exception_handler(404, not_found)
