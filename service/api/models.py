"""Model routes: what the model host holds (GET /v1/models), and loading, swapping or
unloading one role. Thin: the host decides what fits and when."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import require_token, services
from service.api.schemas import ModelsReport, RoleState, errors, refuse_unencodable
from service.errors import InvalidInput, ModelUnavailable
from service.models.roles import Target

router = APIRouter(
    tags=["models"], dependencies=[Depends(require_token)], responses=errors(401, 422)
)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="hub id (already on this machine) or folder; default: the role's own"
    )
    quantize: int | None = Field(None, description="4 or 8: convert once, then use the copy")
    wait: bool = Field(False, description="answer when the load has finished, not at once")


@router.get(
    "/models",
    summary="Both roles: state, source, revision, memory, progress",
    response_model=ModelsReport,
    response_model_exclude_unset=True,
)
async def list_models(request: Request) -> Any:
    return services(request).host.report()


@router.post(
    "/models/{role}/load",
    status_code=202,
    summary="Load or swap a role's model; 409 when it would not fit the memory budget",
    responses={
        200: {"model": RoleState, "description": "loaded (wait: true)"},
        202: {"model": RoleState, "description": "loading"},
        **errors(404, 409, 413),
    },
)
async def load_model(role: str, body: LoadRequest, request: Request) -> JSONResponse:
    refuse_unencodable(body.model, "`model`")
    host = services(request).host
    current = host.roles.get(role)
    source = body.model or (current.target.source if current else "")
    try:
        await host.load(role, Target(source, body.quantize), wait=body.wait)
    except ModelUnavailable as exc:
        # A model asked for by name that is missing or broken is the request's fault; the
        # service itself goes on serving with what it holds.
        raise InvalidInput(exc.message, code=exc.code) from None
    return JSONResponse(host.roles[role].describe(), status_code=200 if body.wait else 202)


@router.post(
    "/models/{role}/unload",
    summary="Free a role's model; the next job reloads it",
    response_model=RoleState,
    response_model_exclude_unset=True,
    responses=errors(404, 413),
)
async def unload_model(role: str, request: Request) -> Any:
    host = services(request).host
    await host.unload(role)
    return host.roles[role].describe()
