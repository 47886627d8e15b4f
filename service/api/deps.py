"""What every route may ask for: the running services and, when configured, a bearer token."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized
from service.services import Services


def services(request: Request) -> Services:
    return request.app.state.services


def require_token(request: Request) -> None:
    token = services(request).settings.token
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
        raise Unauthorized(
            "this service requires `Authorization: Bearer <token>` (the AIP_TOKEN it was "
            "started with)",
            code="unauthorized",
        )
