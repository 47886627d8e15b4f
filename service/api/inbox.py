"""GET /v1/inbox: the watcher's state (path, events or polling, pending files, counts) and
the ledger's last filings and rejections;
POST /v1/inbox/reprocess: a new job for an inbox file, even one whose content was seen."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import require_token, services
from service.api.jobs import job_after_commit
from service.api.schemas import InboxStatus, Job, errors, refuse_unencodable
from service.config import Settings
from service.errors import Conflict

RECENT = 20  # ledger rows shown: enough to see what happened to the last batch dropped in

router = APIRouter(tags=["inbox"], dependencies=[Depends(require_token)], responses=errors(401))


@router.get(
    "/inbox",
    summary="The watched inbox: where, how, what it did since start, and its last filings",
    response_model=InboxStatus,
    response_model_exclude_unset=True,
)
async def inbox_status(request: Request) -> Any:
    svc = services(request)
    watcher = svc.inbox
    if watcher is None:
        return {"enabled": False, "standby": True} if _standby(svc.settings) else {"enabled": False}
    recent = await watcher.ledger.recent(RECENT)
    return {"enabled": True, **watcher.status(), "recent": [asdict(f) for f in recent]}


class ReprocessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(
        description="a file in the inbox or its processed/ or failed/ folders: absolute, or "
        "relative to the inbox"
    )


@router.post(
    "/inbox/reprocess",
    status_code=202,
    summary="Process an inbox file again (a duplicate, say) as a new job; the file stays put",
    responses={202: {"model": Job}, **errors(403, 404, 409, 413, 415, 422, 507)},
)
async def reprocess(request: Request, body: ReprocessRequest) -> Response:
    refuse_unencodable(body.path, "`path`")
    svc = services(request)
    if svc.inbox is None and _standby(svc.settings):
        raise Conflict(
            "another node on this database watches the inbox: ask that node (GET /v1/nodes "
            "lists them), or submit the file with `aip submit`",
            code="inbox_elsewhere",
        )
    if svc.inbox is None:
        raise Conflict(
            "this service's inbox is off (AIP_INBOX_ENABLED=0), so it does not process inbox "
            "files; turn it on, or submit the file with `aip submit`",
            code="inbox_disabled",
        )
    async with svc.intake_slots:
        job_id = await svc.inbox.reprocess(body.path)
    return await job_after_commit(svc, job_id, "queued", 202, {"Location": f"/v1/jobs/{job_id}"})


def _standby(settings: Settings) -> bool:
    """The inbox is on, and this node is an API node on a shared database: another node
    watches it (service/inbox/standby.py)."""
    return settings.inbox_enabled and settings.serve_api and settings.database_url is not None
