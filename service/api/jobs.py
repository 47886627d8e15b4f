"""Job routes: submit (upload or allowed path), show, list, cancel, retry, and the stored image."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from service.api.deps import require_token, services
from service.api.filters import job_filter
from service.errors import Gone, InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.intake import confined_path, inspect_image, read_confined, store_image
from service.pipeline import build_params
from service.store.history import JobFilter

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_token)])

_FORM_FIELDS = {"image", "queries", "query", "prompt", "max_attempts"}
_JSON_FIELDS = {"path", "queries", "prompt", "max_attempts"}
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
                            "description": "repeatable, or one comma-separated value",
                        },
                        "prompt": {"type": "string"},
                        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10},
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
                    },
                }
            },
        },
    }
}


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


async def _from_form(request: Request) -> tuple[bytes, str, list[str], str | None, Any]:
    form = await request.form(max_files=1, max_fields=64)
    unknown = set(form.keys()) - _FORM_FIELDS
    if unknown:
        raise InvalidInput(
            f"unknown form fields: {', '.join(sorted(unknown))}; expected image, queries, "
            "prompt, max_attempts",
            code="unknown_fields",
        )
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("the multipart field `image` (a file) is required", code="missing_image")
    data = await upload.read()
    queries = [str(v) for v in [*form.getlist("queries"), *form.getlist("query")]]
    prompt = form.get("prompt")
    return (
        data,
        upload.filename or "upload",
        queries,
        prompt if isinstance(prompt, str) else None,
        form.get("max_attempts"),
    )


async def _from_json(
    request: Request, max_bytes: int
) -> tuple[bytes, str, list[str], str | None, Any]:
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
    path = confined_path(body["path"], services(request).settings.allowed_dirs)
    queries = body.get("queries") or []
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise InvalidInput("`queries` must be a list of strings", code="invalid_queries")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidInput("`prompt` must be a string", code="invalid_prompt")
    data = await asyncio.to_thread(read_confined, path, max_bytes)
    return data, str(path), queries, prompt, body.get("max_attempts")


@router.post(
    "/jobs",
    status_code=202,
    openapi_extra=_SUBMIT_DOC,
    summary="Submit an image (multipart upload, or JSON naming an allowed path)",
)
async def submit(
    request: Request, idempotency_key: str | None = Header(default=None)
) -> JSONResponse:
    svc = services(request)
    settings = svc.settings
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        source = "api"
        data, name, queries, prompt, attempts = await _from_form(request)
    elif content_type.startswith("application/json"):
        source = "path"
        data, name, queries, prompt, attempts = await _from_json(request, settings.max_upload_bytes)
    else:
        raise UnsupportedMedia(
            "send multipart/form-data with an `image` file, or JSON with a `path`",
            code="unsupported_content_type",
        )
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the upload is larger than {settings.max_upload_bytes:,} bytes")
    params = build_params(
        queries,
        prompt,
        default_queries=settings.default_queries,
        default_prompt=settings.default_prompt,
        max_queries=settings.max_queries,
        max_prompt_chars=settings.max_prompt_chars,
    )
    max_attempts = _max_attempts(attempts, settings.max_attempts)
    async with svc.intake_slots:
        record = await asyncio.to_thread(inspect_image, data, max_pixels=settings.max_pixels)
        await asyncio.to_thread(store_image, data, record, settings.data_dir)
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
    svc.worker.notify()
    view = await svc.reads.job(job_id)
    return JSONResponse(
        view, status_code=202 if created else 200, headers={"Location": f"/v1/jobs/{job_id}"}
    )


@router.get("/jobs", summary="Jobs, newest first, filtered")
async def list_jobs(
    request: Request,
    where: Annotated[JobFilter, Depends(job_filter)],
    sort: str = Query(default="created", description="created|finished (newest first)"),
    cursor: str | None = Query(default=None, description="next_cursor from the previous page"),
    limit: int = Query(default=50),
) -> dict[str, Any]:
    return await services(request).reads.page(where, sort=sort, cursor=cursor, limit=limit)


@router.get("/jobs/{job_id}", summary="One job: status, input, parameters, timings, result")
async def show_job(request: Request, job_id: int) -> dict[str, Any]:
    return await services(request).reads.job(job_id)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a queued job, or stop a running one")
async def cancel_job(request: Request, job_id: int) -> JSONResponse:
    svc = services(request)
    status = await svc.queue.request_cancel(job_id)
    if status == "running":
        svc.worker.cancel(job_id)
    view = await svc.reads.job(job_id)
    return JSONResponse(view, status_code=200 if status == "cancelled" else 202)


@router.post("/jobs/{job_id}/retry", status_code=202, summary="Queue a failed job again")
async def retry_job(request: Request, job_id: int) -> dict[str, Any]:
    svc = services(request)
    await svc.queue.retry(job_id)
    svc.worker.notify()
    return await svc.reads.job(job_id)


@router.get("/jobs/{job_id}/image", summary="The stored input image")
async def job_image(request: Request, job_id: int) -> FileResponse:
    svc = services(request)
    image = await svc.reads.image_of(job_id)
    path = svc.settings.data_dir / image.path
    if image.pruned_at is not None or not path.is_file():
        raise Gone(
            f"job {job_id}'s stored image is no longer in the data directory", code="image_gone"
        )
    return FileResponse(
        path,
        media_type=_MEDIA.get(image.format, "application/octet-stream"),
    )
