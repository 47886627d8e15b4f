"""The history filters as query parameters, shared by the job list, statistics and exports, and
the rule that those routes refuse a query parameter they do not take."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from pydantic import WithJsonSchema

from service import flights
from service.api.deps import services
from service.errors import InvalidInput
from service.store.history import SORTS, SOURCES, JobFilter
from service.store.queue import STATUSES


def _enum(values: tuple[str, ...]) -> WithJsonSchema:
    """Documented as an enum, checked by JobFilter: a wrong value is 422 `invalid_filter` with
    the allowed values, like every other filter."""
    return WithJsonSchema({"type": "string", "enum": list(values)})


StatusFilter = Annotated[str | None, Query(description="|".join(STATUSES)), _enum(STATUSES)]
SourceFilter = Annotated[str | None, Query(description="|".join(SOURCES)), _enum(SOURCES)]
Sort = Annotated[str, Query(description="created|finished (newest first)"), _enum(SORTS)]
PAGING = ("sort", "cursor", "limit")


def job_filter(
    status: StatusFilter = None,
    source: SourceFilter = None,
    created_after: str | None = Query(None, description="ISO 8601 date/time (UTC) or Unix s"),
    created_before: str | None = Query(None, description="ISO 8601 date/time (UTC) or Unix s"),
    captured_after: str | None = Query(None, description="EXIF capture time (camera local)"),
    captured_before: str | None = Query(None, description="EXIF capture time (camera local)"),
    folder: str | None = Query(None, description="inbox subfolder, e.g. flights/2026-11-17"),
    label: str | None = Query(None, description="jobs with a detection of this label"),
    min_count: int | None = Query(None, description="... at least this many of them"),
    q: str | None = Query(None, description="words that must all appear in prompt or reasoning"),
    bbox: str | None = Query(
        None,
        description="minlon,minlat,maxlon,maxlat (WGS84 degrees): jobs whose frame on the "
        "ground overlaps the box",
    ),
    min_size_m: str | None = Query(
        None, description="jobs with a detection (of label, if given) this many metres across"
    ),
    flight: str | None = Query(None, description="jobs of this flight (GET /v1/flights)"),
) -> JobFilter:
    return JobFilter.parse(
        status=status,
        source=source,
        created_after=created_after,
        created_before=created_before,
        captured_after=captured_after,
        captured_before=captured_before,
        folder=folder,
        label=label,
        min_count=min_count,
        q=q,
        bbox=bbox,
        min_size_m=min_size_m,
        flight=flight,
    )


FILTERS = tuple(inspect.signature(job_filter).parameters)


async def resolved_filter(
    request: Request, where: Annotated[JobFilter, Depends(job_filter)]
) -> JobFilter:
    """The filters, with a flight grouped by capture time resolved to its jobs."""
    return await flights.resolve(services(request), where)


def takes_only(*own: str, filters: bool = True) -> Callable[[Request], Any]:
    """A dependency refusing query parameters other than the filters (unless `filters` is
    False) and `own`: a misspelt filter would otherwise be ignored and widen the answer
    without a word, a misspelt `since` give a report without the changes."""
    allowed = (*own, *(FILTERS if filters else ()))

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(allowed))
        if not unknown:
            return
        name = unknown[0]
        why = (
            "; only GET /v1/jobs pages (exports and statistics cover every matching job)"
            if name in PAGING
            else ""
        )
        raise InvalidInput(
            f"this route does not take the query parameter {name[:100]!r}{why}; it takes "
            f"{', '.join(allowed) or 'none'}",
            code="invalid_filter",
        )

    return check
