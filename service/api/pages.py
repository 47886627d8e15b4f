"""The dashboard's HTML routes and its /static assets, shipped in the package: one page shell
whose JavaScript modules read everything through the public /v1 API. It knows no job, model or
token: a page never knows more than the API does. The browser guard (Host, Origin) runs before
these routes like any other; every answer here forbids content from any other origin."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from service.api.schemas import JobId

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
PAGES = ("/", "/submit", "/models", "/inbox", "/stats", "/map")

router = APIRouter(include_in_schema=False)


def shell() -> HTMLResponse:
    """The one HTML document; the path tells the modules which page to draw."""
    return HTMLResponse((WEB / "index.html").read_text(encoding="utf-8"), headers=HEADERS)


async def _page() -> HTMLResponse:
    return shell()


for _path in PAGES:
    router.add_api_route(_path, _page, methods=["GET"], response_class=HTMLResponse)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(job_id: JobId) -> HTMLResponse:
    return shell()


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
