"""Flight routes: the flights, one flight, its report (HTML, or PDF where Chromium is installed),
what changed between two flights (JSON or GeoJSON; described by the reasoner on request), and
placing finished jobs again."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service import change_pairs, flights
from service.api.deps import require_token, services
from service.api.filters import resolved_filter, takes_only
from service.api.schemas import (
    ChangeDescriptions,
    FlightChanges,
    FlightList,
    Placed,
    errors,
    typed,
)
from service.api.schemas import Flight as FlightBody
from service.errors import InvalidInput, Unavailable
from service.geo.pdf import PdfError, find_converter, html_to_pdf
from service.georeference import KEEP, place_again
from service.jobspec import parse_options
from service.store.history import JobFilter

router = APIRouter(
    tags=["flights"], dependencies=[Depends(require_token)], responses=errors(401, 422)
)
FlightName = Annotated[str, Query(description="a flight's id, as GET /v1/flights lists it")]
# The report's own policy, sent as a header too: it runs nothing and fetches nothing.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def takes(*own: str) -> Any:
    return Depends(takes_only(*own, filters=False))


@router.get(
    "/flights",
    summary="Frames grouped into flights, newest first",
    response_model=FlightList,
    dependencies=[takes()],
)
async def list_flights(request: Request) -> Response:
    found = await flights.all_flights(services(request))
    return typed(FlightList, {"flights": [f.to_dict() for f in found]})


@router.get(
    "/flights/{name:path}",
    summary="One flight: its frames, time span, ground covered, counts and sizes per label",
    response_model=FlightBody,
    responses=errors(404),
    dependencies=[takes()],
)
async def one_flight(request: Request, name: str) -> Response:
    return typed(FlightBody, (await flights.flight(services(request), name)).to_dict())


@router.get(
    "/reports/{name:path}",
    summary="The flight's report: map, counts and real sizes, annotated frames, answers",
    response_class=HTMLResponse,
    responses={
        200: {"content": {"text/html": {}, "application/pdf": {}}},
        **errors(404, 422, 503),
    },
    dependencies=[takes("since", "format")],
)
async def flight_report(
    request: Request,
    name: str,
    since: Annotated[
        str | None, Query(description="an earlier flight over the same ground: what changed")
    ] = None,
    format: Annotated[str, Query(description="html|pdf (pdf needs Chromium)")] = "html",
) -> Response:
    if format not in ("html", "pdf"):
        raise InvalidInput("format must be html or pdf", code="unknown_format")
    converter = find_converter() if format == "pdf" else None
    if format == "pdf" and converter is None:
        raise Unavailable(
            "printing a PDF needs Chromium on this machine (apt-get install chromium, or set "
            "AIP_CHROMIUM); the HTML report (format=html) needs nothing",
            code="pdf_unavailable",
        )
    html = await flights.report(services(request), name, since=since)
    filename = _filename(name)
    if format == "html":
        return HTMLResponse(
            html,
            headers={
                "Content-Disposition": f'inline; filename="{filename}.html"',
                "Content-Security-Policy": REPORT_CSP,
            },
        )
    return Response(
        await _pdf(html),
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="{filename}.pdf"'},
    )


@router.get(
    "/changes",
    summary="What changed between two flights over the same ground: new, gone, moved",
    response_model=FlightChanges,
    responses={200: {"content": {"application/geo+json": {}}}, **errors(404, 422)},
    dependencies=[takes("before", "after", "format")],
)
async def flight_changes(
    request: Request,
    before: FlightName,
    after: FlightName,
    format: Annotated[str, Query(description="json|geojson")] = "json",
) -> Response:
    if format not in ("json", "geojson"):
        raise InvalidInput("format must be json or geojson", code="unknown_format")
    found = await flights.changes(services(request), before, after)
    if format == "geojson":
        return Response(json.dumps(found.to_geojson()), media_type="application/geo+json")
    return typed(FlightChanges, {"before": before, "after": after, **found.to_dict()})


@router.post(
    "/changes/describe",
    status_code=202,
    summary="Queue a job per new, gone or moved object: the reasoner describes the change, "
    "given its place in both flights side by side",
    response_model=ChangeDescriptions,
    responses=errors(404, 413, 422, 507),
    dependencies=[takes("before", "after", "kinds", "limit")],
)
async def describe_changes(
    request: Request,
    before: FlightName,
    after: FlightName,
    kinds: Annotated[str | None, Query(description="any of new,gone,moved (default: all)")] = None,
    limit: Annotated[
        int | None,
        Query(
            description=f"describe the first N (1..{change_pairs.MAX_LIMIT}); without it more "
            f"than {change_pairs.MAX_UNASKED} changes is refused"
        ),
    ] = None,
) -> Response:
    described = await change_pairs.describe(
        services(request),
        before,
        after,
        kinds=change_pairs.parse_kinds(kinds),
        limit=limit,
    )
    body = {"before": before, "after": after, "jobs": [d.to_dict() for d in described]}
    return typed(ChangeDescriptions, body, 202)


class GroundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ground_elevation: float | None = Field(
        None,
        description="metres above sea level for every matching job, kept in its parameters; "
        "null: flat ground at take-off height; absent: each job keeps its own",
    )


@router.post(
    "/georeference",
    summary="Work out where the matching finished jobs' detections are again",
    response_model=Placed,
    dependencies=[Depends(takes_only())],
    responses=errors(413, 422),
)
async def georeference_again(
    request: Request,
    where: Annotated[JobFilter, Depends(resolved_filter)],
    body: GroundRequest | None = None,
) -> Response:
    elevation: Any = KEEP
    if body is not None and "ground_elevation" in body.model_fields_set:
        elevation = body.ground_elevation
        if elevation is not None:
            elevation = parse_options({"ground_elevation": elevation}, "the request")[
                "ground_elevation"
            ]
    placed = await place_again(services(request), where, elevation)
    return typed(Placed, placed.to_dict())


def _filename(name: str) -> str:
    """The flight's name as a download's file name: letters, digits, `-`, `_`, `.` only."""
    kept = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in name)
    return f"flight-{kept.strip('-.')[:80] or 'report'}"


async def _pdf(html: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="aip-report-") as folder:
        target = Path(folder) / "report.pdf"
        try:
            await asyncio.to_thread(html_to_pdf, html, target)
        except PdfError as exc:
            raise Unavailable(str(exc), code="pdf_failed") from None
        return target.read_bytes()
