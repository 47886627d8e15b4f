"""GET /v1/inbox: the watcher's state (path, events or polling, pending files, counts)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from service.api.deps import require_token, services

router = APIRouter(tags=["inbox"], dependencies=[Depends(require_token)])


@router.get("/inbox", summary="The watched inbox: where, how, and what it did since start")
async def inbox_status(request: Request) -> dict[str, Any]:
    watcher = services(request).inbox
    if watcher is None:
        return {"enabled": False}
    return {"enabled": True, **watcher.status()}
