"""The browser edge, before any route runs: a request is admitted only when its Host names this
service (DNS rebinding) and its Origin is this service or one the user listed (cross-site
requests); listed origins get CORS answers. It knows nothing of routes, tokens or jobs."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any, ClassVar
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.schemas import ErrorBody
from service.config import Settings
from service.errors import Forbidden

log = logging.getLogger("aip")

CORS_METHODS = "GET, HEAD, POST"
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key"
CORS_EXPOSE = "Location, Content-Disposition"
CORS_MAX_AGE = "600"
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
_DEFAULT_PORTS = {"http": 80, "https": 443}

HostPort = tuple[str, int | None]


def split_host(value: str) -> HostPort | None:
    """`name`, `name:port`, `v4:port`, `[v6]:port` (or a bare v6) as (host, port), lower-cased
    with a trailing dot dropped; None when it is not a host at all."""
    text = value.strip().lower()
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text  # a name, an IPv4 address or a bare IPv6 address
    port: int | None = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            return None
        port = int(port_text)
    host = host.removesuffix(".")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        return None
    return host, port


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """localhost, *.localhost (RFC 6761), 127.0.0.0/8 and ::1 (also as ::ffff:127.x.y.z)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback


class HostRule:
    """Which Host header values name this service."""

    def __init__(self, allowed: Iterable[str], bind: str) -> None:
        entries = [entry.strip().lower() for entry in allowed if entry.strip()]
        self.any = "*" in entries
        self.exact: list[HostPort] = []
        self.suffixes: list[str] = []  # from `*.example.org`
        for entry in entries:
            if entry.startswith("*.") and len(entry) > 2:
                self.suffixes.append(entry[1:])
            elif entry != "*":
                parsed = split_host(entry)
                if parsed is None:
                    log.warning("AIP_ALLOWED_HOSTS: %r is not a host name; ignored", entry)
                else:
                    self.exact.append(parsed)
        # Listening beyond loopback, the address the service was told to use names it too.
        self.any_address = bind.strip() in _WILDCARD_BINDS
        if self.any_address:
            name = socket.gethostname().lower()
            for own in {name, name.split(".")[0], name.split(".")[0] + ".local"}:
                self.exact.append((own, None))
        elif not is_loopback(bind.strip().lower().strip("[]")):
            self.exact.append((bind.strip().lower().strip("[]"), None))

    def admits(self, host: str, port: int | None) -> bool:
        if self.any or is_loopback(host):
            return True
        # A browser sends an address literal only when the user typed that address, so it
        # cannot be a rebound name.
        if self.any_address and _address(host) is not None:
            return True
        if any(host == h and (p is None or p == port) for h, p in self.exact):
            return True
        return any(host.endswith(suffix) for suffix in self.suffixes)


OriginKey = tuple[str, str, int]


def origin_key(origin: str) -> OriginKey | None:
    """(scheme, host, port) of `scheme://host[:port]`, the port defaulted from the scheme."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username is not None:
        return None
    # Schemes with no default port (browser extensions, apps) compare by scheme and host.
    default = _DEFAULT_PORTS.get(parts.scheme, 0)
    return parts.scheme, parts.hostname.removesuffix("."), port or default


class OriginRule:
    """Which Origin header values may call the API: this service's own pages, and the listed."""

    def __init__(self, allowed: Iterable[str]) -> None:
        entries = [entry.strip().lower().rstrip("/") for entry in allowed if entry.strip()]
        self.any = "*" in entries
        self.null = "null" in entries
        self.listed: set[OriginKey] = set()
        for entry in entries:
            if entry in ("*", "null"):
                continue
            key = origin_key(entry)
            if key is None:
                log.warning(
                    "AIP_ALLOWED_ORIGINS: %r is not an origin like http://localhost:3000; ignored",
                    entry,
                )
            else:
                self.listed.add(key)

    def is_listed(self, origin: str) -> bool:
        if self.any:
            return True
        if origin.strip().lower() == "null":
            return self.null
        key = origin_key(origin)
        return key is not None and key in self.listed


def same_origin(origin: str, host: HostPort | None, server_port: int | None) -> bool:
    """Does `origin` name this service: the address the request was sent to (its Host header),
    or a loopback name on the port the service listens on?"""
    key = origin_key(origin)
    if key is None:
        return False
    scheme, origin_host, origin_port = key
    if host is not None:
        header_host, header_port = host
        # No port in the Host header: the scheme's default, whichever scheme a proxy ended.
        if origin_host == header_host and (
            origin_port == header_port
            or (header_port is None and origin_port == _DEFAULT_PORTS.get(scheme))
        ):
            return True
    return scheme == "http" and is_loopback(origin_host) and origin_port == server_port


def _cross_site_subresource(headers: Headers, method: str) -> bool:
    """A page on another site embedding a URL of ours (<img>, <script>): browsers send no Origin
    for those, but they do say so in Sec-Fetch-Site. Top-level navigations stay allowed: the
    page that linked here cannot read what opens."""
    if headers.get("sec-fetch-site") not in ("cross-site", "same-site"):
        return False
    navigation = (
        headers.get("sec-fetch-mode") == "navigate"
        and method in ("GET", "HEAD")
        and headers.get("sec-fetch-dest") not in ("object", "embed")
    )
    return not navigation


def host_refused(value: str) -> Forbidden:
    return Forbidden(
        f"Host {value[:100]!r} does not name this service (a web page may be trying to reach it "
        "under another name); use a loopback address such as 127.0.0.1, or add the name to "
        "AIP_ALLOWED_HOSTS (comma-separated) to admit it",
        code="host_not_allowed",
    )


def origin_refused(origin: str | None) -> Forbidden:
    where = f"the web page at {origin[:100]!r}" if origin else "a page on another site"
    return Forbidden(
        f"requests from {where} are refused: only this service's own pages and the origins "
        "listed in AIP_ALLOWED_ORIGINS (comma-separated, e.g. http://localhost:3000) may call it",
        code="origin_not_allowed",
    )


class BrowserGuard:
    """Pure ASGI middleware: refuse a foreign Host or Origin with 403 `{code, message}` before
    routing; answer CORS (preflights included) for the origins the user listed."""

    # What it can answer on every route, for the app's OpenAPI document.
    responses: ClassVar[dict[int | str, dict[str, Any]]] = {
        403: {
            "model": ErrorBody,
            "description": "host_not_allowed or origin_not_allowed: a Host or Origin this "
            "service does not admit (AIP_ALLOWED_HOSTS, AIP_ALLOWED_ORIGINS)",
        }
    }

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hosts = HostRule(settings.allowed_hosts, settings.host)
        self.origins = OriginRule(settings.allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method = scope["method"]
        raw_host = headers.get("host")
        host = split_host(raw_host) if raw_host is not None else None
        # No Host header at all cannot come from a browser (HTTP/1.0 tools): nothing to rebind.
        if raw_host is not None and (host is None or not self.hosts.admits(*host)):
            await _refuse(host_refused(raw_host), scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is None:
            if _cross_site_subresource(headers, method) and not self.origins.any:
                await _refuse(origin_refused(None), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        server = scope.get("server")
        server_port = server[1] if server else None
        if same_origin(origin, host, server_port):
            await self.app(scope, receive, send)
            return
        if not self.origins.is_listed(origin):
            await _refuse(origin_refused(origin), scope, receive, send)
            return
        if method == "OPTIONS" and "access-control-request-method" in headers:
            await _preflight(origin, headers)(scope, receive, send)
            return
        await self.app(scope, receive, _with_cors(origin, send))


def _preflight(origin: str, headers: Headers) -> Response:
    answer = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": CORS_HEADERS,
        "Access-Control-Max-Age": CORS_MAX_AGE,
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    # Chrome asks before a public page may reach a loopback address; the user listed this one.
    if headers.get("access-control-request-private-network") == "true":
        answer["Access-Control-Allow-Private-Network"] = "true"
    return Response(status_code=204, headers=answer)


def _with_cors(origin: str, send: Send) -> Send:
    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            headers = MutableHeaders(scope=message)
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
            headers.add_vary_header("Origin")
        await send(message)

    return send_with_cors


async def _refuse(error: Forbidden, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(error.to_dict(), status_code=error.status)(scope, receive, send)
