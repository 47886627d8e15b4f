"""Reads a small JSON request body, refusing it past a size limit before it is all in memory."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from service.errors import InvalidInput, PayloadTooLarge


async def json_body(request: Request, max_bytes: int, hint: str) -> Any:
    """The parsed body, read up to `max_bytes` (413 past it, `hint` saying what to send)."""
    too_large = PayloadTooLarge(f"the body is over {max_bytes // 1024} KiB: {hint}")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise too_large
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput("the body is not valid JSON", code="invalid_json") from None
