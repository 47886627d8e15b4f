"""GET /v1/nodes: every process that serves the API or works the queue on this store, with
its state (alive, lost, stopped), its current job and how many jobs it has done."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from service.api.deps import require_token, services
from service.api.schemas import NodeList, errors
from service.store import nodes as store

router = APIRouter(tags=["nodes"], dependencies=[Depends(require_token)], responses=errors(401))


@router.get(
    "/nodes",
    summary="The nodes on this store: alive, lost (beats late) or stopped",
    response_model=NodeList,
    response_model_exclude_unset=True,
)
async def list_nodes(request: Request) -> dict[str, Any]:
    rows = await store.listing(services(request).queue)
    return {"nodes": [store.view(row) for row in rows]}
