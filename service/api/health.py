"""GET /v1/health: are the models loaded, how deep is the queue, which version is this and
which CPU BLAS and device it computes with. With a token configured, a caller without it learns the
status and nothing else."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__
from service.api.deps import has_token, services
from service.api.schemas import Health, typed
from service.diskspace import problem
from service.models import blas, device
from service.services import Services

router = APIRouter(tags=["health"])


def assess(svc: Services) -> tuple[str, list[str]]:
    """The service's status and, unless it is `ok`, one sentence per reason."""
    models = svc.host.describe()
    if svc.host.ready:
        # Up, but refusing new jobs (507) until space is freed: degraded, still 200.
        disk = problem(svc.settings.data_dir, svc.settings.database.parent)
        return ("ok", []) if disk is None else ("degraded", [disk["reason"]])
    failed = [m for m in models if m.get("state") == "failed"]
    if failed:
        return "failed", [
            f"the {m.get('role')} model failed to load: {m.get('error') or 'see the log'}"
            for m in failed
        ]
    return "loading", ["the models are still loading"]


@router.get(
    "/health",
    summary="Liveness and readiness: 200 once the models serve, 503 while they load or failed",
    responses={200: {"model": Health}, 503: {"model": Health}},
)
async def health(request: Request) -> Response:
    svc = services(request)
    status, reasons = assess(svc)
    code = 200 if svc.host.ready else 503
    if not has_token(request):
        return typed(Health, {"status": status}, status_code=code)
    counts = await svc.queue.counts()
    body: dict[str, Any] = {
        "status": status,
        "reasons": reasons,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - svc.started, 1),
        "models": svc.host.describe(),
        "queue": {"depth": counts["queued"], "running": counts["running"], "counts": counts},
        "worker": {
            "id": svc.worker.id,
            "current_job": svc.worker.current.job_id if svc.worker.current else None,
        },
        "cpu_blas": blas.describe(),  # measured once at model-host start: a read here
        "device": device.describe(),  # likewise
    }
    return typed(Health, body, status_code=code)
