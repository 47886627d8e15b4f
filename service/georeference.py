"""Placing finished jobs on the ground again: jobs stored before geometry was worked out, or a
flight whose ground turned out to be at another height. Reads views, writes only geometry."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from service.errors import InvalidInput
from service.geo.georef import georeference
from service.services import Services
from service.store.db import Db
from service.store.ground import rewrite
from service.store.history import JobFilter
from service.store.reads import EXPORT_PAGE

KEEP = object()  # no ground elevation given: each job keeps its own


@dataclasses.dataclass
class Placed:
    jobs: int = 0  # finished jobs placed again
    located: int = 0  # of them, frames now on the ground
    detections: int = 0  # detections now on the ground

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _place(job: dict[str, Any], elevation: Any) -> tuple[int, dict[str, Any], list[Any], Any, Any]:
    params = job["params"]
    changed = None
    if elevation is not KEEP and params.get("ground_elevation") != elevation:
        changed = {k: v for k, v in params.items() if k != "ground_elevation"}
        if elevation is not None:
            changed["ground_elevation"] = elevation
    image, detections = job["input"], job["result"]["detections"]
    geo, detection_geo = georeference(
        image["exif"],
        image["width"],
        image["height"],
        [d["box"] for d in detections],
        params.get("ground_elevation") if elevation is KEEP else elevation,
    )
    return job["id"], geo, detection_geo, changed, (image["exif"] or {}).get("gps")


def _place_all(jobs: list[dict[str, Any]], elevation: Any) -> list[Any]:
    return [_place(job, elevation) for job in jobs]


async def place_again(svc: Services, where: JobFilter, elevation: Any = KEEP) -> Placed:
    """Work out the geometry of every succeeded job `where` matches again, from its stored EXIF
    and boxes; with `elevation` (metres above sea level, or None for flat ground at take-off
    height) as the ground of them all, kept in their parameters for later. A page of jobs is
    one transaction: a job retried meanwhile (no result) is left alone."""
    if where.status not in (None, "succeeded"):
        raise InvalidInput(
            "only succeeded jobs have detections to place; leave status out", code="invalid_filter"
        )
    where = dataclasses.replace(where, status="succeeded")
    placed = Placed()
    async for page in await svc.reads.stream(where, batch=min(EXPORT_PAGE, 200)):
        rows = await asyncio.to_thread(_place_all, page, elevation)

        def write(db: Db, rows: list[Any] = rows) -> list[tuple[dict[str, Any], list[Any]]]:
            return [
                (geo, found)
                for job_id, geo, found, params, gps in rows
                if rewrite(db, job_id, geo, found, gps, params)
            ]

        for geo, found in await svc.queue.write(write):
            placed.jobs += 1
            placed.located += "reason" not in geo
            placed.detections += sum("lat" in d for d in found)
    return placed
