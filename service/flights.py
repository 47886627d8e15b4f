"""Flights over the store: every frame grouped (service/geo/flights.py), one flight's jobs, its
report, and what changed between two; reads only, shared by the API and its routes' CLI."""

from __future__ import annotations

import contextlib
import dataclasses
from datetime import UTC, datetime
from typing import Any

from service.annotated import annotated_jpeg
from service.errors import AipError, InvalidInput, NotFound
from service.geo.changes import Changes, compare
from service.geo.flights import Flight, FlightFrame, group_flights, summarize
from service.geo.names import is_auto
from service.geo.report import render_report
from service.services import Services
from service.store.history import JobFilter
from service.store.reads import flown_view, located_view

# A report embeds each frame with detections; past this many it would be too large to open.
MAX_REPORT_FRAMES = 500


async def _frames(svc: Services, where: JobFilter) -> list[FlightFrame]:
    frames: list[FlightFrame] = []
    async for page in await svc.reads.stream(where, project=flown_view):
        frames.extend(FlightFrame.from_job(job) for job in page)
    return frames


async def all_flights(svc: Services) -> list[Flight]:
    """Every flight, newest first: one read of the jobs with a flight or a capture time."""
    return group_flights(await _frames(svc, JobFilter()))


async def flight(svc: Services, name: str) -> Flight:
    """One flight. A given name reads only its own jobs; a grouped one (auto-…, which no given
    name may be) groups the jobs without a given flight."""
    if is_auto(name):
        grouped = group_flights(await _frames(svc, JobFilter(no_flight=True)))
        found = next((f for f in grouped if f.id == name), None)
    else:
        frames = await _frames(svc, JobFilter(flight=name))
        found = summarize(name, True, frames) if frames else None
    if found is None:
        raise NotFound(
            f"there is no flight named {name[:200]!r}; GET /v1/flights lists them",
            code="flight_not_found",
        )
    return found


async def resolve(svc: Services, where: JobFilter) -> JobFilter:
    """`where` with a flight grouped by capture time turned into its jobs; a given flight
    matches on its column."""
    if where.flight is None or not is_auto(where.flight):
        return where
    found = await flight(svc, where.flight)
    return dataclasses.replace(where, job_ids=tuple(found.job_ids))


async def flight_jobs(svc: Services, found: Flight) -> list[dict[str, Any]]:
    """The flight's jobs as the API shows them, in capture order."""
    where = JobFilter(job_ids=tuple(found.job_ids))
    jobs: dict[int, dict[str, Any]] = {}
    async for page in await svc.reads.stream(where):
        jobs.update((job["id"], job) for job in page)
    return [jobs[i] for i in found.job_ids if i in jobs]


async def _located(svc: Services, name: str) -> list[dict[str, Any]]:
    """What comparing reads of a flight's jobs (their detections on the ground and frame
    footprints), in one read for a given flight."""
    where = JobFilter(flight=name)
    if is_auto(name):
        where = JobFilter(job_ids=tuple((await flight(svc, name)).job_ids))
    jobs: list[dict[str, Any]] = []
    async for page in await svc.reads.stream(where, project=located_view):
        jobs.extend(page)
    if not jobs and not is_auto(name):
        await flight(svc, name)  # NotFound, unless its frames are merely unplaced
    return jobs


async def changes(svc: Services, before: str, after: str) -> Changes:
    if before == after:
        raise InvalidInput("compare two different flights", code="invalid_flight")
    return compare(await _located(svc, before), await _located(svc, after))


async def report(svc: Services, name: str, *, since: str | None = None) -> str:
    """The flight's report as one self-contained HTML document; with `since` (an earlier
    flight over the same ground), what changed since it too."""
    found = await flight(svc, name)
    jobs = await flight_jobs(svc, found)
    shown = [j for j in jobs if (j.get("result") or {}).get("detections")]
    if len(shown) > MAX_REPORT_FRAMES:
        raise InvalidInput(
            f"flight {name!r} has {len(shown)} frames with detections; a report shows at most "
            f"{MAX_REPORT_FRAMES}: export its detections instead "
            f"(GET /v1/exports/jobs.geojson?flight=...)",
            code="report_too_large",
        )
    # Compared first: an unknown `since` is refused before any frame is drawn.
    compared = (await changes(svc, since, name)).to_dict() if since is not None else None
    frames: dict[int, bytes] = {}
    for job in shown:
        # A frame whose image is gone (retention) or still being redacted is listed unshown.
        with contextlib.suppress(AipError):
            frames[job["id"]] = await annotated_jpeg(svc, job)
    return render_report(
        found.to_dict(),
        jobs,
        frames,
        changes=compared,
        title=f"Flight report: {name}" + (f", with what changed since {since}" if since else ""),
        generated_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    )
