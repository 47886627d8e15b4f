"""GET /v1/health: are the models loaded, how deep is the queue, which version is this."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service import __version__
from service.api.deps import services

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    svc = services(request)
    counts = await svc.queue.counts()
    ready = svc.host.ready
    states = {state["state"] for state in svc.host.describe()}
    status = "ok" if ready else ("failed" if "failed" in states else "loading")
    body = {
        "status": status,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - svc.started, 1),
        "models": svc.host.describe(),
        "queue": {"depth": counts["queued"], "running": counts["running"], "counts": counts},
        "worker": {
            "id": svc.worker.id,
            "current_job": svc.worker.current.job_id if svc.worker.current else None,
        },
    }
    return JSONResponse(body, status_code=200 if ready else 503)
