"""Profile routes: list, show, create or replace, delete, and choose the default profile.

    GET    /v1/profiles                 every profile, and which is the default
    GET    /v1/profiles/{name}          one profile
    PUT    /v1/profiles/{name}          create (201) or replace (200): {description?, params}
    DELETE /v1/profiles/{name}          remove (204); shipped profiles are read-only (409)
    PUT    /v1/profiles/{name}/default  make it the default profile (200)
    DELETE /v1/profiles/{name}/default  it stops being the default, if it was (204)

A job takes its profile's parameters when it names none of its own for them; the default
profile applies to jobs and inbox folders that name no profile."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.api.bodies import json_body
from service.api.deps import require_token, services
from service.api.schemas import Body, TilingSpec, errors, refuse_unencodable, typed
from service.config import Settings
from service.errors import InvalidInput
from service.jobspec import parse_options
from service.params import TOKEN_LIMITS, token_limit
from service.profiles import check_name
from service.store.profiles import MAX_DESCRIPTION, Profile

router = APIRouter(
    tags=["profiles"], dependencies=[Depends(require_token)], responses=errors(401, 422)
)

# A profile is options and a schema (at most 16 KiB): a body far over that is refused unread.
MAX_BODY = 64 * 1024
ProfileName = Annotated[
    str, Path(description="lowercase letters, digits and hyphens, e.g. roof-solar")
]


class ProfileLinks(Body):
    self: str


class ProfileParams(Body):
    """The job options a profile sets; a job's own options, then its folder's, win over them."""

    queries: list[str] | None = None
    prompt: str | None = None
    tiling: Literal["auto", "off"] | TilingSpec | None = None
    set_of_marks: bool | None = None
    response_schema: dict[str, Any] | None = Field(None, description="JSON Schema of the answer")
    redact: list[str] | None = Field(None, description="classes blurred in images handed out")
    keep_original: bool | None = None
    detect_max_tokens: int | None = None
    reason_max_tokens: int | None = None
    webhook: str | None = Field(None, description="http(s) URL finished jobs are POSTed to")


class ProfileView(Body):
    name: str
    description: str
    params: ProfileParams
    builtin: bool = Field(description="shipped with the service: read-only")
    default: bool = Field(description="applies to jobs and inbox folders that name no profile")
    created_at: str
    updated_at: str
    links: ProfileLinks


class ProfileList(Body):
    profiles: list[ProfileView] = Field(description="by name")
    default: str | None = Field(description="the default profile's name; null when none")


class ProfileInput(BaseModel):
    description: str = Field("", max_length=MAX_DESCRIPTION)
    params: dict[str, Any] = Field(
        description="job options: queries, prompt, tiling, set_of_marks, response_schema, "
        "redact, keep_original, detect_max_tokens, reason_max_tokens, webhook"
    )


_PUT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ProfileInput.model_json_schema()}},
    }
}


def _profile_input(body: Any, name: str, settings: Settings) -> tuple[str, dict[str, Any]]:
    """The description and the checked parameters of a PUT body."""
    if not isinstance(body, dict):
        raise InvalidInput("the JSON body must be an object", code="invalid_json")
    extra = set(body) - {"description", "params"}
    if extra:
        raise InvalidInput(
            f"unknown fields: {', '.join(sorted(extra))}; expected description, params",
            code="unknown_fields",
        )
    refuse_unencodable(body)
    description = body.get("description", "")
    if not isinstance(description, str):
        raise InvalidInput("`description` must be a string", code="invalid_description")
    params = body.get("params")
    if not isinstance(params, dict):
        raise InvalidInput(
            "`params` (an object of job options) is required", code="invalid_options"
        )
    if "profile" in params:
        raise InvalidInput("a profile's params cannot name another profile", code="invalid_options")
    options = parse_options(params, f"profile {name}")
    for limit in TOKEN_LIMITS:  # over this service's ceiling: refused here, not at each job
        if limit in options:
            try:
                token_limit(options[limit], limit, getattr(settings, limit))
            except InvalidInput as exc:
                raise InvalidInput(f"profile {name}: {exc.message}", code=exc.code) from None
    return description, options


@router.get(
    "/profiles", summary="Every profile, and which is the default", response_model=ProfileList
)
async def list_profiles(request: Request) -> Response:
    profiles = await services(request).profiles.list()
    default = next((p.name for p in profiles if p.is_default), None)
    return typed(ProfileList, {"profiles": [p.view() for p in profiles], "default": default})


# Before the routes of `{name:path}`, which would take `NAME/default` as a name.
@router.put(
    "/profiles/{name}/default",
    summary="Make a profile the default",
    response_model=ProfileView,
    responses=errors(404),
)
async def set_default(request: Request, name: ProfileName) -> Response:
    chosen: Profile | None = await services(request).profiles.set_default(name)
    assert chosen is not None
    return typed(ProfileView, chosen.view())


@router.delete(
    "/profiles/{name}/default",
    summary="Stop a profile being the default (no default remains)",
    status_code=204,
    responses=errors(404),
)
async def clear_default(request: Request, name: ProfileName) -> Response:
    await services(request).profiles.clear_default(name)
    return Response(status_code=204)


@router.get(
    "/profiles/{name:path}",
    summary="One profile",
    response_model=ProfileView,
    responses=errors(404),
)
async def show(request: Request, name: ProfileName) -> Response:
    return typed(ProfileView, (await services(request).profiles.get(check_name(name))).view())


@router.put(
    "/profiles/{name:path}",
    summary="Create or replace a profile",
    openapi_extra=_PUT_DOC,
    responses={
        200: {"model": ProfileView, "description": "replaced"},
        201: {"model": ProfileView, "description": "created"},
        **errors(409, 413),
    },
)
async def put(request: Request, name: ProfileName) -> Response:
    check_name(name)
    body = await json_body(request, MAX_BODY, "a profile is a few options and a short schema")
    refuse_unencodable(body)
    description, params = _profile_input(body, name, services(request).settings)
    stored, created = await services(request).profiles.put(name, description, params)
    view = stored.view()
    if created:
        return typed(ProfileView, view, 201, {"Location": view["links"]["self"]})
    return typed(ProfileView, view)


@router.delete(
    "/profiles/{name:path}", summary="Delete a profile", status_code=204, responses=errors(404, 409)
)
async def delete(request: Request, name: ProfileName) -> Response:
    await services(request).profiles.delete(name)
    return Response(status_code=204)
