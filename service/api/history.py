"""History routes: statistics, streamed exports, the annotated image, and retention."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from service.annotated import annotated_jpeg
from service.api.deps import require_token, services
from service.api.filters import Sort, resolved_filter, takes_only
from service.api.schemas import JobId, PruneReport, Stats, errors, typed
from service.config import parse_age
from service.errors import InvalidInput, NotFound
from service.exports import FORMATS, PROJECTIONS, WRITERS, to_csv
from service.store.history import JobFilter
from service.store.retention import prune
from service.store.stats import job_stats

router = APIRouter(
    tags=["history"], dependencies=[Depends(require_token)], responses=errors(401, 422)
)
Filter = Annotated[JobFilter, Depends(resolved_filter)]


@router.get(
    "/stats",
    summary="Jobs by status and day, detections per label, mean timings",
    response_model=Stats,
    dependencies=[Depends(takes_only())],
)
async def stats(request: Request, where: Filter) -> Response:
    return typed(Stats, await job_stats(services(request).reads.engine, where))


@router.get(
    "/exports/jobs.{fmt}",
    summary="Stream the filtered jobs as csv|jsonl|geojson|kml|coco",
    response_class=StreamingResponse,
    responses={200: {"content": {media: {} for media in FORMATS.values()}}, **errors(404)},
    # Every matching job in one body: `cursor` and `limit` would mean nothing here.
    dependencies=[Depends(takes_only("sort"))],
)
async def export(
    request: Request, fmt: str, where: Filter, sort: Sort = "created"
) -> StreamingResponse:
    if fmt not in WRITERS:
        raise NotFound(
            f"no export format {fmt!r}; use one of {', '.join(FORMATS)}", code="unknown_format"
        )
    # The filters are checked and the first page read before the 200 goes out, so a query
    # that fails does so as a proper error response, not as a body cut short.
    reads = services(request).reads
    writer = WRITERS[fmt]
    if fmt == "csv":  # its header names the answers' fields before the first row
        writer = partial(to_csv, answer_fields=await reads.answer_fields(where))
    jobs = await reads.stream(where, sort=sort, project=PROJECTIONS[fmt])
    return StreamingResponse(
        writer(jobs),
        media_type=FORMATS[fmt],
        headers={"Content-Disposition": f'attachment; filename="jobs.{fmt}"'},
    )


@router.get(
    "/jobs/{job_id}/annotated",
    summary="The input with numbered boxes and masks",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **errors(404, 409, 410)},
)
async def annotated(request: Request, job_id: JobId) -> Response:
    svc = services(request)
    job = await svc.reads.job(job_id)
    return Response(await annotated_jpeg(svc, job), media_type="image/jpeg")


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    older_than: str
    keep_results: bool = False
    dry_run: bool = False


@router.post(
    "/prune",
    summary="Remove finished jobs (or only their images) older than an age",
    response_model=PruneReport,
    responses=errors(413),
)
async def prune_history(request: Request, body: PruneRequest) -> Any:
    svc = services(request)
    try:
        age = parse_age(body.older_than)
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_age") from None
    report = await prune(
        svc.queue,
        svc.settings.data_dir,
        older_than_seconds=age,
        keep_results=body.keep_results,
        dry_run=body.dry_run,
        files=svc.files,
    )
    return {"dry_run": body.dry_run, **report.to_dict()}
