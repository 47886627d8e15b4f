"""Jobs grouped into flights (by name, or by capture gaps and take-off height), summarised."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pymap3d
import shapely
from shapely.geometry import Point, Polygon
from shapely.geometry.base import BaseGeometry

from service.geo.names import auto_name

__all__ = [
    "Flight",
    "FlightFrame",
    "LocalPlane",
    "as_mapping",
    "finite",
    "group_flights",
    "lonlat_ring",
    "parse_time",
    "summarize",
]


def as_mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def finite(value: object) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def parse_time(value: object) -> datetime | None:
    """An ISO capture time (or EXIF's 'YYYY:MM:DD HH:MM:SS') as a naive local datetime.

    Capture times are the camera's local wall clock; an offset, when present, is dropped rather
    than converted so that frames with and without one still compare on the same clock.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if len(text) >= 19 and text[4] == ":" and text[7] == ":":
        text = text[:4] + "-" + text[5:7] + "-" + text[8:]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.replace(tzinfo=None)


def lonlat_ring(value: object) -> list[list[float]] | None:
    """A footprint ring of [lon, lat] pairs with at least three corners, or None."""
    if not isinstance(value, list | tuple):
        return None
    ring: list[list[float]] = []
    for point in value:
        if not isinstance(point, list | tuple) or len(point) < 2:
            return None
        lon, lat = finite(point[0]), finite(point[1])
        if lon is None or lat is None or not (-180 <= lon <= 180 and -90 <= lat <= 90):
            return None
        ring.append([lon, lat])
    return ring if len({(p[0], p[1]) for p in ring}) >= 3 else None


class LocalPlane:
    """A local east/north tangent plane in metres around a reference point (pymap3d ENU).

    Flights and change comparisons cover a few kilometres at most, where the plane's distortion
    is far below the geolocation uncertainty; heights are taken as zero (horizontal positions).
    """

    def __init__(self, lat0: float, lon0: float) -> None:
        self.lat0 = lat0
        self.lon0 = lon0

    @classmethod
    def around(cls, lons: Sequence[float], lats: Sequence[float]) -> LocalPlane:
        """A plane centred on the bounding box of the given points."""
        return cls((min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2)

    def project(self, lons: Sequence[float], lats: Sequence[float]) -> np.ndarray:
        """(N, 2) east/north metres for N lon/lat pairs, in one vectorised call."""
        if not lons:
            return np.zeros((0, 2))
        east, north, _ = pymap3d.geodetic2enu(
            np.asarray(lats, dtype=float),
            np.asarray(lons, dtype=float),
            0.0,
            self.lat0,
            self.lon0,
            0.0,
        )
        return np.column_stack([np.atleast_1d(east), np.atleast_1d(north)])

    def points(self, lonlats: Sequence[tuple[float, float]]) -> list[Point]:
        xy = self.project([p[0] for p in lonlats], [p[1] for p in lonlats])
        return [Point(x, y) for x, y in xy]

    def union(self, rings: Sequence[list[list[float]]]) -> BaseGeometry:
        """The union of footprint rings as one geometry in plane metres (empty when none)."""
        lons = [p[0] for ring in rings for p in ring]
        lats = [p[1] for ring in rings for p in ring]
        xy = self.project(lons, lats)
        polygons: list[BaseGeometry] = []
        start = 0
        for ring in rings:
            polygon: BaseGeometry = Polygon(xy[start : start + len(ring)])
            start += len(ring)
            if not polygon.is_valid:
                # A footprint whose corners came out crossed still covers its valid part.
                polygon = shapely.make_valid(polygon)
            if not polygon.is_empty:
                polygons.append(polygon)
        if not polygons:
            return Polygon()
        return shapely.union_all(polygons)


@dataclass(frozen=True)
class FlightFrame:
    """What flight grouping and summaries need from one job."""

    job_id: int
    flight: str | None = None
    captured_at: str | None = None
    lat: float | None = None
    lon: float | None = None
    takeoff_altitude: float | None = None
    footprint: list[list[float]] | None = None
    labels: tuple[str, ...] = ()
    sizes: tuple[float | None, ...] = ()

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> FlightFrame:
        """Build from a job view dict (GET /v1/jobs/{id} shape); missing parts become None."""
        inputs = as_mapping(job.get("input"))
        exif = as_mapping(inputs.get("exif"))
        gps = as_mapping(exif.get("gps"))
        dji = as_mapping(exif.get("dji"))
        result = as_mapping(job.get("result"))
        frame_geo = as_mapping(result.get("geo"))
        camera = as_mapping(frame_geo.get("camera"))

        flight = job.get("flight")
        name = flight.strip() if isinstance(flight, str) and flight.strip() else None

        when = parse_time(inputs.get("captured_at")) or parse_time(exif.get("captured_at"))
        captured_at = when.isoformat(timespec="seconds") if when else None

        lat = finite(camera.get("lat"))
        lon = finite(camera.get("lon"))
        if lat is None or lon is None:
            lat, lon = finite(gps.get("latitude")), finite(gps.get("longitude"))
        if lat is None or lon is None:
            lat = lon = None

        absolute = finite(dji.get("absolute_altitude"))
        if absolute is None:
            absolute = finite(gps.get("altitude"))
        relative = finite(dji.get("relative_altitude"))
        takeoff = absolute - relative if absolute is not None and relative is not None else None

        labels: list[str] = []
        sizes: list[float | None] = []
        detections = result.get("detections")
        for detection in detections if isinstance(detections, list) else []:
            detection = as_mapping(detection)
            labels.append(str(detection.get("label", "")))
            if "size_m" in detection:  # the store's column: the larger side, already known
                sizes.append(finite(detection["size_m"]))
                continue
            geo = as_mapping(detection.get("geo"))
            extents = [
                v
                for v in (finite(geo.get("width_m")), finite(geo.get("height_m")))
                if v is not None
            ]
            sizes.append(max(extents) if extents else None)

        raw_id = job.get("id")
        return cls(
            job_id=raw_id if isinstance(raw_id, int) else int(str(raw_id)),
            flight=name,
            captured_at=captured_at,
            lat=lat,
            lon=lon,
            takeoff_altitude=takeoff,
            footprint=lonlat_ring(frame_geo.get("footprint")),
            labels=tuple(labels),
            sizes=tuple(sizes),
        )


@dataclass
class Flight:
    """One flight's frames and what they show."""

    id: str
    explicit: bool
    job_ids: list[int]
    frames: int
    started: str | None
    ended: str | None
    located: int
    area_m2: float
    bbox: list[float] | None
    counts: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "explicit": self.explicit,
            "started": self.started,
            "ended": self.ended,
            "frames": self.frames,
            "located": self.located,
            "area_m2": round(self.area_m2, 1),
            "bbox": [round(v, 7) for v in self.bbox] if self.bbox else None,
            "counts": dict(self.counts),
            "sizes": {
                label: {key: round(value, 2) for key, value in stats.items()}
                for label, stats in self.sizes.items()
            },
            "job_ids": list(self.job_ids),
        }


def _order(frame: FlightFrame) -> tuple[int, datetime, int]:
    when = parse_time(frame.captured_at)
    return (0, when, frame.job_id) if when else (1, datetime.min, frame.job_id)


def summarize(flight_id: str, explicit: bool, frames: Sequence[FlightFrame]) -> Flight:
    """One flight's summary: span, covered area (union of footprints), counts and sizes."""
    ordered = sorted(frames, key=_order)
    times = [t for t in (parse_time(f.captured_at) for f in ordered) if t]
    rings = [f.footprint for f in ordered if f.footprint and lonlat_ring(f.footprint)]

    lons = [p[0] for ring in rings for p in ring]
    lats = [p[1] for ring in rings for p in ring]
    lons += [f.lon for f in ordered if f.lon is not None and f.lat is not None]
    lats += [f.lat for f in ordered if f.lon is not None and f.lat is not None]
    bbox = [min(lons), min(lats), max(lons), max(lats)] if lons else None

    area = 0.0
    if rings:
        ring_lons = [p[0] for ring in rings for p in ring]
        ring_lats = [p[1] for ring in rings for p in ring]
        area = float(LocalPlane.around(ring_lons, ring_lats).union(rings).area)

    counts: dict[str, int] = {}
    measured: dict[str, list[float]] = {}
    for frame in ordered:
        for index, label in enumerate(frame.labels):
            counts[label] = counts.get(label, 0) + 1
            size = frame.sizes[index] if index < len(frame.sizes) else None
            if size is not None:
                measured.setdefault(label, []).append(size)
    sizes = {
        label: {
            "min": min(values),
            "median": float(statistics.median(values)),
            "max": max(values),
        }
        for label, values in sorted(measured.items())
    }
    return Flight(
        id=flight_id,
        explicit=explicit,
        job_ids=[f.job_id for f in ordered],
        frames=len(ordered),
        started=times[0].isoformat(timespec="seconds") if times else None,
        ended=times[-1].isoformat(timespec="seconds") if times else None,
        located=len(rings),
        area_m2=area,
        bbox=bbox,
        counts=dict(sorted(counts.items())),
        sizes=sizes,
    )


@dataclass
class _Open:
    """An automatic flight still being collected."""

    frames: list[FlightFrame]
    last: datetime
    takeoff: float | None
    created: int


def _split(
    frames: Iterable[FlightFrame], gap_s: float, takeoff_m: float
) -> list[list[FlightFrame]]:
    """Timed frames into automatic flights.

    In capture order, each frame joins the open flight it continues: its previous frame at most
    gap_s earlier and its last known take-off altitude within takeoff_m (an unknown altitude
    matches any). Keeping several flights open lets two drones flying at once from different
    take-off sites stay two flights instead of alternating fragments.
    """
    timed = sorted(
        ((when, f) for f in frames if (when := parse_time(f.captured_at))),
        key=lambda pair: (pair[0], pair[1].job_id),
    )
    groups: list[_Open] = []
    active: list[_Open] = []
    for when, frame in timed:
        active = [g for g in active if (when - g.last).total_seconds() <= gap_s]
        alt = frame.takeoff_altitude
        fits = [
            g
            for g in active
            if alt is None or g.takeoff is None or abs(alt - g.takeoff) <= takeoff_m
        ]
        if fits:
            # Prefer a flight whose take-off altitude is known to match, then the latest one.
            chosen = min(
                fits,
                key=lambda g: (alt is not None and g.takeoff is None, when - g.last, g.created),
            )
            chosen.frames.append(frame)
            chosen.last = when
            if alt is not None:
                chosen.takeoff = alt
        else:
            chosen = _Open([frame], when, alt, len(groups))
            groups.append(chosen)
            active.append(chosen)
    return [g.frames for g in groups]


def group_flights(
    frames: Iterable[FlightFrame], *, gap_s: float = 600.0, takeoff_m: float = 15.0
) -> list[Flight]:
    """Frames grouped into flights, newest first.

    A frame with an explicit flight name belongs to that flight, whatever its times. The others
    with a capture time are split into automatic flights at capture gaps over gap_s and at
    take-off altitude changes over takeoff_m (another take-off site); those are named
    'auto-YYYYMMDD-HHMMSS' after their first frame (-2, -3 on a clash, in time order). Frames with
    neither a name nor a capture time belong to no flight.
    """
    frames = list(frames)
    named: dict[str, list[FlightFrame]] = {}
    for frame in frames:
        if frame.flight:
            named.setdefault(frame.flight, []).append(frame)
    flights = [summarize(name, True, members) for name, members in named.items()]

    taken = set(named)
    for members in _split((f for f in frames if not f.flight), gap_s, takeoff_m):
        first = parse_time(members[0].captured_at)
        assert first is not None  # _split only keeps timed frames
        base = auto_name(first)
        flight_id, n = base, 1
        while flight_id in taken:
            n += 1
            flight_id = f"{base}-{n}"
        taken.add(flight_id)
        flights.append(summarize(flight_id, False, members))

    undated = [f for f in flights if f.started is None]
    dated = [f for f in flights if f.started is not None]
    dated.sort(key=lambda f: f.id)
    dated.sort(key=lambda f: str(f.started), reverse=True)
    undated.sort(key=lambda f: f.id)
    return dated + undated
