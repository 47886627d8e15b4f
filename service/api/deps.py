"""What every route may ask for: the running services and, when configured, a bearer token."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized
from service.services import Services

# Declared so the OpenAPI document (and /docs' Authorize button) knows about the token.
bearer = HTTPBearer(
    auto_error=False,
    description="Needed only when the service was started with AIP_TOKEN (or --token).",
)


def services(request: Request) -> Services:
    return request.app.state.services


def configured_token(request: Request) -> str | None:
    return services(request).settings.token or None


def token_matches(given: bytes, token: str) -> bool:
    """Constant-time comparison of bytes: a non-ASCII value is a mismatch, not a TypeError."""
    return hmac.compare_digest(given, token.encode("utf-8"))


def header_token(request: Request) -> bytes | None:
    """The bearer token of the Authorization header, as the bytes the client sent."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    # Starlette decodes header values as latin-1, so this gives back the bytes on the wire.
    return given.strip().encode("latin-1")


def has_token(request: Request) -> bool:
    """True when no token is configured or the request carries the right one."""
    token = configured_token(request)
    if token is None:
        return True
    given = header_token(request)
    return given is not None and token_matches(given, token)


def unauthorized() -> Unauthorized:
    return Unauthorized(
        "this service requires `Authorization: Bearer <token>` (the AIP_TOKEN it was started with)",
        code="unauthorized",
    )


def require_token(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    if not has_token(request):
        raise unauthorized()


def require_token_or_query(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    token: Annotated[
        str | None,
        Query(
            max_length=1000,
            description="the token, for a browser's EventSource, which cannot send headers "
            "(this route only)",
        ),
    ] = None,
) -> None:
    """`require_token`, or the token as `?token=`: for the event stream alone, whose browser
    client (EventSource) cannot set an Authorization header."""
    configured = configured_token(request)
    if configured is None or has_token(request):
        return
    if token is None or not token_matches(token.encode("utf-8", "surrogatepass"), configured):
        raise unauthorized()
