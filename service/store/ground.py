"""A job's ground geometry as the store keeps it: the plain columns the history filters read
(the frame's lon/lat box, each detection's size), and writing it again for finished jobs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from service.store.db import Db


def ground_bounds(
    geo: dict[str, Any] | None, gps: dict[str, Any] | None = None
) -> tuple[float | None, ...]:
    """(west, south, east, north) of the frame's footprint on the ground, for the bbox filter;
    the camera's position when there is no footprint (a frame with GPS but no pose) or it
    crosses the antimeridian; all None when neither is known."""
    ring = (geo or {}).get("footprint")
    if ring:
        lons, lats = [p[0] for p in ring], [p[1] for p in ring]
        # A footprint across the antimeridian would span the globe as a plain box: it is
        # filtered by its camera's position instead.
        if max(lons) - min(lons) <= 180:
            return (min(lons), min(lats), max(lons), max(lats))
    camera = (geo or {}).get("camera") or {}
    lat, lon = camera.get("lat"), camera.get("lon")
    if (lat is None or lon is None) and gps:
        lat, lon = gps.get("latitude"), gps.get("longitude")
    if isinstance(lat, int | float) and isinstance(lon, int | float):
        return (lon, lat, lon, lat)
    return (None,) * 4


def ground_size(geo: dict[str, Any] | None) -> float | None:
    """A located detection's larger ground side in metres, for the min_size_m filter."""
    sides = [geo.get(k) for k in ("width_m", "height_m")] if geo else []
    known = [s for s in sides if isinstance(s, int | float)]
    return max(known) if known else None


def rewrite(
    db: Db,
    job_id: int,
    geo: dict[str, Any],
    detection_geo: Sequence[dict[str, Any]],
    gps: dict[str, Any] | None,
    params: dict[str, Any] | None,
) -> bool:
    """Put a finished job's geometry (and, when given, its parameters) in place of what it had,
    inside the caller's transaction; False when it has no result any more (retried, pruned)."""
    done = db.execute(
        "UPDATE results SET geo = ?, west = ?, south = ?, east = ?, north = ? WHERE job_id = ?",
        (json.dumps(geo), *ground_bounds(geo, gps), job_id),
    )
    if not done.rowcount:
        return False
    db.executemany(
        "UPDATE detections SET geo = ?, size_m = ? WHERE job_id = ? AND idx = ?",
        [
            (json.dumps(where), ground_size(where), job_id, number)
            for number, where in enumerate(detection_geo, start=1)
        ],
    )
    if params is not None:
        db.execute("UPDATE jobs SET params = ? WHERE id = ?", (json.dumps(params), job_id))
    return True
