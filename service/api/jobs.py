"""Job routes: submit (upload or allowed path), show, list, cancel, retry, and the stored image."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from service.api.deps import require_token, services
from service.api.filters import Sort, resolved_filter, takes_only
from service.api.schemas import Job, JobId, JobPage, errors, refuse_unencodable, typed
from service.confine import read_confined
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.handout import handed_out
from service.jobspec import parse_options, resolve
from service.params import TOKEN_LIMITS, token_limit
from service.services import Services
from service.store.history import JobFilter
from service.store.reads import MAX_PAGE
from service.uploads import announce, store_image

log = logging.getLogger("aip")
router = APIRouter(tags=["jobs"], dependencies=[Depends(require_token)], responses=errors(401, 422))

# The job options service.jobspec checks and resolves (profile, folder and settings below).
_SPEC = (
    "profile",
    "tiling",
    "set_of_marks",
    "response_schema",
    "redact",
    "keep_original",
    "webhook",
    "ground_elevation",
    "flight",
)
_OPTIONS = ("max_attempts", "detect_max_tokens", "reason_max_tokens", *_SPEC)
_FORM_FIELDS = {"image", "queries", "query", "prompt", *_OPTIONS}
_JSON_FIELDS = {"path", "queries", "prompt", *_OPTIONS}
_TOKENS_DOC = {
    "detect_max_tokens": "tokens per detection query; default and ceiling: AIP_DETECT_MAX_TOKENS",
    "reason_max_tokens": "tokens of reasoning; default and ceiling: AIP_REASON_MAX_TOKENS",
}
_TILING_DOC = (
    '"auto" (tiles when the frame is larger than the detector sees; the default), "off", '
    'or {"size": 128..4096, "overlap": 0..size/2, "full_frame": true}'
)
_FLAG = {"type": "boolean"}


def _spec_doc(form: bool) -> dict[str, Any]:
    """The job options, as multipart fields (`form`: text) or JSON values."""
    json_text = " (JSON text)" if form else ""
    return {
        "profile": {
            "type": "string",
            "description": "a named profile's parameters under this job's own "
            "(default: the default profile, if any)",
        },
        "tiling": {"description": _TILING_DOC + json_text},
        "set_of_marks": {
            **_FLAG,
            "description": "the reasoner also sees the image with numbered boxes drawn",
        },
        "response_schema": {
            "type": "string" if form else "object",
            "description": "a JSON Schema the answer must match" + json_text,
        },
        "redact": {
            "type": "array",
            "items": {"type": "string", "maxLength": 200},
            "maxItems": 16,
            "description": "classes blurred in every image handed out"
            + (" (repeatable, or comma-separated)" if form else ""),
        },
        "keep_original": {
            **_FLAG,
            "description": "false: the original is deleted once redacted copies exist",
        },
        "webhook": {
            "type": "string",
            "format": "uri",
            "maxLength": 2000,
            "description": "http(s) URL the finished job is POSTed to, signed "
            "(default: its profile's, else AIP_WEBHOOK_URL)",
        },
        "ground_elevation": {
            "type": "string" if form else "number",
            "description": "the ground's height in metres above sea level, for where "
            "detections are (default: flat ground at the take-off point's height)",
        },
        "flight": {
            "type": "string",
            "maxLength": 200,
            "description": "the flight this frame belongs to (default: its inbox folder, "
            "else grouped by capture time)",
        },
    }


_MEDIA = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "GIF": "image/gif",
}

_SUBMIT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "queries": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "repeatable, or one comma-separated value; none "
                            "from the job, its profile or AIP_QUERIES: the reasoner proposes them",
                        },
                        "prompt": {"type": "string"},
                        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10},
                        **{
                            name: {"type": "integer", "minimum": 1, "description": text}
                            for name, text in _TOKENS_DOC.items()
                        },
                        **_spec_doc(form=True),
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["path"],
                    "properties": {
                        "path": {"type": "string", "description": "inside AIP_ALLOWED_DIRS"},
                        "queries": {"type": "array", "items": {"type": "string"}},
                        "prompt": {"type": "string"},
                        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10},
                        **{
                            name: {"type": "integer", "minimum": 1, "description": text}
                            for name, text in _TOKENS_DOC.items()
                        },
                        **_spec_doc(form=False),
                    },
                }
            },
        },
    }
}


def upload_too_large(limit: int) -> PayloadTooLarge:
    """The one message for an upload over the limit, wherever it is caught."""
    return PayloadTooLarge(
        f"the upload is larger than the limit of {limit / 2**20:,.1f} MiB ({limit:,} bytes); "
        "raise AIP_MAX_UPLOAD_BYTES (e.g. 512M or 1G) to accept it",
    )


def _check_json(raw: bytes) -> None:
    """Refuse, as 422, JSON that parses into trouble: nesting deep enough to exhaust the
    parser's recursion, integers past Python's digit limit, text with lone surrogates."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput(
            "the body is not valid JSON (or nests or counts too deep to read)",
            code="invalid_json",
        ) from None
    refuse_unencodable(body)


def _max_attempts(raw: Any, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise TypeError
        value = int(raw)
    except (TypeError, ValueError):
        raise InvalidInput("max_attempts must be a whole number", code="invalid_option") from None
    if not 1 <= value <= 10:
        raise InvalidInput("max_attempts must be 1..10", code="invalid_option")
    return value


async def _from_form(
    request: Request,
) -> tuple[bytes, str, list[str], str | None, dict[str, Any]]:
    form = await request.form(max_files=1, max_fields=64)
    unknown = set(form.keys()) - _FORM_FIELDS
    if unknown:
        raise InvalidInput(
            f"unknown form fields: {', '.join(sorted(unknown))}; expected image, queries, "
            f"prompt, {', '.join(_OPTIONS)}",
            code="unknown_fields",
        )
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("the multipart field `image` (a file) is required", code="missing_image")
    data = await upload.read()
    queries = [str(v) for v in [*form.getlist("queries"), *form.getlist("query")]]
    prompt = form.get("prompt")
    options: dict[str, Any] = {name: form.get(name) for name in _OPTIONS}
    options["redact"] = [str(v) for v in form.getlist("redact")] or None
    return (
        data,
        upload.filename or "upload",
        queries,
        prompt if isinstance(prompt, str) else None,
        options,
    )


async def _from_json(
    request: Request, max_bytes: int
) -> tuple[bytes, str, list[str], str | None, dict[str, Any]]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("the body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidInput("the JSON body must be an object", code="invalid_json")
    unknown = set(body) - _JSON_FIELDS
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(sorted(unknown))}", code="unknown_fields")
    if not isinstance(body.get("path"), str):
        raise InvalidInput("`path` (a file path on this machine) is required", code="missing_path")
    queries = body.get("queries") or []
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise InvalidInput("`queries` must be a list of strings", code="invalid_queries")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidInput("`prompt` must be a string", code="invalid_prompt")
    allowed = services(request).settings.allowed_dirs
    data, path = await asyncio.to_thread(read_confined, body["path"], allowed, max_bytes)
    return data, path, queries, prompt, {name: body.get(name) for name in _OPTIONS}


async def job_after_commit(
    svc: Services, job_id: int, status: str, status_code: int, headers: dict[str, str] | None = None
) -> Response:
    """The job as it is now. Its change is already committed, so a failing read must not
    turn into an error the client would retry (a second job): answer with what is known."""
    try:
        return typed(Job, await svc.reads.job(job_id), status_code, headers)
    except Exception:
        log.exception("job %d: reading it back after a commit failed", job_id)
        known = {"id": job_id, "status": status, "links": {"self": f"/v1/jobs/{job_id}"}}
        return JSONResponse(known, status_code=status_code, headers=headers)


@router.post(
    "/jobs",
    status_code=202,
    openapi_extra=_SUBMIT_DOC,
    summary="Submit an image (multipart upload, or JSON naming an allowed path)",
    responses={
        200: {"model": Job, "description": "the job an earlier request with this key made"},
        202: {"model": Job, "description": "queued"},
        **errors(403, 409, 413, 415, 507),
    },
)
async def submit(
    request: Request,
    idempotency_key: str | None = Header(
        default=None,
        min_length=1,
        max_length=200,
        description="the same key and request again returns the first job, not a new one",
    ),
) -> Response:
    # Everything that can refuse the request happens before the enqueue commits: an error
    # after it would make a client's retry create a second job.
    svc = services(request)
    settings = svc.settings
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        source = "api"
        data, name, queries, prompt, options = await _from_form(request)
    elif content_type.startswith("application/json"):
        source = "path"
        _check_json(await request.body())
        data, name, queries, prompt, options = await _from_json(request, settings.max_upload_bytes)
    else:
        raise UnsupportedMedia(
            "send multipart/form-data with an `image` file, or JSON with a `path`",
            code="unsupported_content_type",
        )
    if len(data) > settings.max_upload_bytes:
        raise upload_too_large(settings.max_upload_bytes)
    refuse_unencodable(name, "the file name")
    refuse_unencodable(queries, "`queries`")
    refuse_unencodable(prompt, "`prompt`")
    raw = {name: options[name] for name in _SPEC}
    refuse_unencodable(raw, "the job's options")
    for limit in TOKEN_LIMITS:  # refused with the ceiling this service sets
        if options[limit] not in (None, ""):
            raw[limit] = token_limit(options[limit], limit, getattr(settings, limit))
    given = parse_options({**raw, "queries": queries, "prompt": prompt}, "the request")
    params = await resolve(given, None, svc.profiles, settings)
    max_attempts = _max_attempts(options["max_attempts"], settings.max_attempts)
    record = await store_image(svc, data)
    request_hash = hashlib.sha256(
        json.dumps([record.sha256, params.to_dict(), max_attempts]).encode()
    ).hexdigest()
    job_id, created = await svc.queue.enqueue(
        record,
        params.to_dict(),
        input_name=PurePath(name).name if source == "path" else name,
        source_path=name if source == "path" else None,
        source=source,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    if created:
        announce(svc, job_id, source, PurePath(name).name)
    else:
        svc.worker.notify()
    location = {"Location": f"/v1/jobs/{job_id}"}
    return await job_after_commit(svc, job_id, "queued", 202 if created else 200, location)


@router.get(
    "/jobs",
    summary="Jobs, newest first, filtered",
    response_model=JobPage,
    dependencies=[Depends(takes_only("sort", "cursor", "limit"))],
)
async def list_jobs(
    request: Request,
    where: Annotated[JobFilter, Depends(resolved_filter)],
    sort: Sort = "created",
    cursor: str | None = Query(
        default=None, max_length=1000, description="next_cursor from the previous page"
    ),
    limit: int = Query(default=50, description=f"1..{MAX_PAGE}"),
) -> Response:
    page = await services(request).reads.page(where, sort=sort, cursor=cursor, limit=limit)
    return typed(JobPage, page)


@router.get(
    "/jobs/{job_id}",
    summary="One job: status, input, parameters, timings, result",
    response_model=Job,
    responses=errors(404),
)
async def show_job(request: Request, job_id: JobId) -> Response:
    svc = services(request)
    view = await svc.reads.job(job_id)
    # Progress for a waiting client: its place in the queue, then the stage it is in.
    queued, running = view["status"] == "queued", view["status"] == "running"
    view["queue_position"] = await svc.reads.queue_position(job_id) if queued else None
    view["stage"] = svc.worker.stage_of(job_id) if running else None
    return typed(Job, view)


@router.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a queued job, or stop a running one",
    responses={
        200: {"model": Job, "description": "cancelled"},
        202: {"model": Job, "description": "running: asked to stop at its next stage"},
        **errors(404, 409, 413),
    },
)
async def cancel_job(request: Request, job_id: JobId) -> Response:
    svc = services(request)
    status = await svc.queue.request_cancel(job_id)
    if status == "running":
        svc.worker.cancel(job_id)
    else:
        svc.events.publish("job.cancelled", {}, job_id=job_id)
    return await job_after_commit(svc, job_id, status, 200 if status == "cancelled" else 202)


@router.post(
    "/jobs/{job_id}/retry",
    status_code=202,
    summary="Queue a failed or cancelled job again, with as many attempts as it first had",
    responses={202: {"model": Job}, **errors(404, 409, 413)},
)
async def retry_job(request: Request, job_id: JobId) -> Response:
    svc = services(request)
    await svc.queue.retry(job_id)
    svc.events.publish(
        "job.retrying",
        {"code": "retried", "message": "queued again on request", "retry_in": 0.0},
        job_id=job_id,
    )
    svc.worker.notify()
    return await job_after_commit(svc, job_id, "queued", 202)


@router.get(
    "/jobs/{job_id}/image",
    summary="The stored input image",
    response_class=FileResponse,
    responses={
        200: {"content": {media: {} for media in sorted(set(_MEDIA.values()))}},
        **errors(404, 409, 410),
    },
)
async def job_image(request: Request, job_id: JobId) -> FileResponse:
    svc = services(request)
    found = await handed_out(svc, job_id)
    return FileResponse(found.path, media_type=_MEDIA.get(found.format, "application/octet-stream"))
