"""GET /docs and /openapi.json: Swagger UI served from the swagger-ui-bundle package (never a
CDN), behind the token when one is configured. It knows nothing of the routes it documents."""

from __future__ import annotations

import hashlib
import hmac
import html

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from service.api.deps import configured_token, has_token, token_matches
from service.errors import Unauthorized

ASSETS = "/docs/assets"
# Holds a key derived from the token, never the token itself, and opens only the docs: the
# API's routes take the bearer header alone, so the cookie cannot make a cross-site request
# count as authenticated.
COOKIE = "aip_docs"

router = APIRouter(include_in_schema=False)


def docs_key(token: str) -> str:
    return hmac.new(token.encode("utf-8"), b"aip docs cookie", hashlib.sha256).hexdigest()


def _may_read_docs(request: Request) -> bool:
    token = configured_token(request)
    if token is None or has_token(request):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and hmac.compare_digest(
        cookie.encode("utf-8"), docs_key(token).encode("ascii")
    )


def _docs_unauthorized() -> Unauthorized:
    return Unauthorized(
        "the API docs need the token this service was started with (AIP_TOKEN): open /docs in "
        "a browser and enter it (it sets a cookie for the docs only), or send "
        "`Authorization: Bearer <token>`",
        code="unauthorized",
    )


def _sign_in_page(request: Request, wrong: bool) -> Response:
    """A browser cannot send a bearer header to /docs: it asks for the token in a form, posted
    back here, so the token never sits in a URL, the history or the access log."""
    if "text/html" not in request.headers.get("accept", ""):
        raise _docs_unauthorized()
    action = html.escape(f"{request.scope.get('root_path', '')}/docs", quote=True)
    note = "<p>That token is not the one this service was started with.</p>" if wrong else ""
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(request.app.title)} — sign in</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto">
<h1>API docs</h1>
<p>This service was started with a token (AIP_TOKEN). Enter it to read the docs; the browser
keeps a cookie that opens the docs only, never the API.</p>{note}
<form method="post" action="{action}">
<input type="password" name="token" autocomplete="current-password" autofocus required>
<button type="submit">Open the docs</button>
</form></body></html>"""
    return HTMLResponse(page, status_code=401)


@router.get("/docs")
async def docs(request: Request) -> Response:
    if not _may_read_docs(request):
        return _sign_in_page(request, wrong=False)
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title=f"{request.app.title} — API",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
        # Swagger UI would otherwise send the document to an online validator.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.post("/docs")
async def sign_in(request: Request) -> Response:
    token = configured_token(request)
    root = request.scope.get("root_path", "")
    if token is None:
        return RedirectResponse(f"{root}/docs", status_code=303)
    try:
        given = (await request.form()).get("token")
    except StarletteHTTPException:  # a body that is not a form holds no token
        given = None
    if not isinstance(given, str) or not token_matches(
        given.encode("utf-8", "surrogatepass"), token
    ):
        return _sign_in_page(request, wrong=True)
    redirect = RedirectResponse(f"{root}/docs", status_code=303)
    redirect.set_cookie(COOKIE, docs_key(token), httponly=True, samesite="strict", path="/")
    return redirect


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    if not _may_read_docs(request):
        raise _docs_unauthorized()
    return JSONResponse(request.app.openapi())


def install(app: FastAPI) -> None:
    """Add /docs, /openapi.json and Swagger UI's files to `app`."""
    app.include_router(router)
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
