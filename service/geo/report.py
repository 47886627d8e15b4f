"""A flight's report as one self-contained HTML document (map, counts and sizes, annotated
frames, answers, assumptions, changes) built from plain job and flight dicts; it refers to
nothing outside itself, so it opens offline, prints, and converts to PDF as it is."""

from __future__ import annotations

import base64
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any

import numpy as np
import pymap3d
from PIL import Image

from service.annotate import PALETTE

SVG_NS = "http://www.w3.org/2000/svg"
MAP_WIDTH = 1000  # SVG user units; the SVG scales to the page
MAP_MIN_HEIGHT = 420
MAP_MAX_HEIGHT = 1000
MAP_MARGIN = 48
MAX_IMAGE_PX = 1600  # longest side of an embedded frame: about 200 dpi across A4
MIN_EXTENT_M = 50.0  # a single point still gets a map with a readable scale
CHANGE_COLOURS = {"new": "#1a9850", "gone": "#d73027", "moved": "#f28e2b"}
Point = tuple[float, float]  # lon, lat
TALLIES = {
    "new": "new",
    "gone": "gone",
    "moved": "moved",
    "same": "unchanged",
    "unseen": "not seen again (outside this flight's frames)",
    "unseen_before": "outside the earlier flight's frames",
}


def render_report(
    flight: dict[str, Any],
    jobs: Sequence[dict[str, Any]],
    frames: Mapping[int, bytes],
    *,
    changes: dict[str, Any] | None = None,
    title: str | None = None,
    generated_at: str,
) -> str:
    """The report of `flight` (a flight summary dict) over its `jobs` (job view dicts);
    `frames` maps a job id to its annotated image (JPEG or PNG bytes), shown for the frames
    that hold detections; `changes` (a comparison with an earlier flight) adds its section
    and its marks on the map."""
    ordered = sorted(jobs, key=_capture_key)
    colours = _label_colours(flight, ordered)
    heading = title or f"Flight report: {flight.get('id', '')}"
    body = [
        _header(heading, flight, ordered, generated_at),
        _map_section(ordered, colours, changes),
        _labels_section(flight, ordered, colours),
        _frame_list_section(ordered),
        _answers_section(ordered),
        _assumptions_section(ordered),
    ]
    if changes is not None:
        body.append(_changes_section(changes))
    body.append(_frames_section(ordered, frames, colours))
    body.append(
        '<footer class="notes"><p>Positions are WGS84 latitude and longitude. The map is a local '
        "east-north projection around the flight's centre, without background imagery. Ground "
        "positions and sizes assume the ground model stated under camera assumptions; "
        "&plusmn; is the 1-sigma horizontal uncertainty.</p>"
        f"<p>Generated {_when(generated_at)}.</p></footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # Nothing here may load anything: should a reference ever slip in, the browser refuses it.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(heading)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --- reading the job dicts -------------------------------------------------------------------


def _result(job: Mapping[str, Any]) -> dict[str, Any]:
    result = job.get("result")
    return result if isinstance(result, dict) else {}


def _input(job: Mapping[str, Any]) -> dict[str, Any]:
    value = job.get("input")
    return value if isinstance(value, dict) else {}


def _frame_geo(job: Mapping[str, Any]) -> dict[str, Any] | None:
    geo = _result(job).get("geo")
    return geo if isinstance(geo, dict) else None


def _camera(job: Mapping[str, Any]) -> dict[str, Any] | None:
    geo = _frame_geo(job)
    camera = geo.get("camera") if geo else None
    return camera if isinstance(camera, dict) and _is_point(camera) else None


def _detections(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = _result(job).get("detections")
    return [d for d in found if isinstance(d, dict)] if isinstance(found, list) else []


def _detection_geo(detection: Mapping[str, Any]) -> dict[str, Any] | None:
    geo = detection.get("geo")
    return geo if isinstance(geo, dict) and _is_point(geo) else None


def _is_point(value: Mapping[str, Any]) -> bool:
    return _finite(value.get("lat")) and _finite(value.get("lon"))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _ring(value: Any) -> list[Point] | None:
    """A [[lon, lat], ...] ring, or None when it is not one."""
    if not isinstance(value, list) or len(value) < 3:
        return None
    ring: list[Point] = []
    for corner in value:
        if not (isinstance(corner, list | tuple) and len(corner) >= 2):
            return None
        if not (_finite(corner[0]) and _finite(corner[1])):
            return None
        ring.append((float(corner[0]), float(corner[1])))
    return ring


def _capture_key(job: Mapping[str, Any]) -> tuple[bool, str, int]:
    captured = _input(job).get("captured_at")
    job_id = job.get("id")
    return (
        not isinstance(captured, str),
        captured if isinstance(captured, str) else "",
        job_id if isinstance(job_id, int) else 0,
    )


def _name(job: Mapping[str, Any]) -> str:
    name = _input(job).get("name") or job.get("source_path")
    return str(name) if name else f"job {job.get('id')}"


def _label_colours(flight: Mapping[str, Any], jobs: Sequence[dict[str, Any]]) -> dict[str, str]:
    counts = _label_counts(flight, jobs)
    ranked = sorted(counts, key=lambda label: (-counts[label], label))
    return {
        label: "#{:02x}{:02x}{:02x}".format(*PALETTE[i % len(PALETTE)])
        for i, label in enumerate(ranked)
    }


def _label_counts(flight: Mapping[str, Any], jobs: Sequence[dict[str, Any]]) -> dict[str, int]:
    given = flight.get("counts")
    if isinstance(given, dict) and given:
        return {str(k): int(v) for k, v in given.items() if _finite(v)}
    counted = Counter(str(d.get("label", "")) for job in jobs for d in _detections(job))
    return dict(counted)


# --- formatting ------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if _finite(value) else "–"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return _e(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return _e(value)
    return f"<code>{_e(_json(value))}</code>"


def _parse(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) and value else None
    except ValueError:
        return None


def _when(value: Any) -> str:
    parsed = _parse(value)
    if parsed is None:
        return _e(value) if isinstance(value, str) and value else "–"
    if parsed.tzinfo is not None:
        return _e(parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
    return _e(parsed.strftime("%Y-%m-%d %H:%M:%S"))


def _span(started: Any, ended: Any) -> str:
    first, last = _parse(started), _parse(ended)
    if first is None or last is None or (first.tzinfo is None) != (last.tzinfo is None):
        return f"{_when(started)} – {_when(ended)}"
    end = _when(ended)
    if first.tzinfo is not None:
        first, last = first.astimezone(UTC), last.astimezone(UTC)
    if first.date() == last.date():
        end = end.split(" ", 1)[1]  # the same day: its time alone
    minutes, seconds = divmod(round(abs((last - first).total_seconds())), 60)
    hours, minutes = divmod(minutes, 60)
    length = (
        f"{hours} h {minutes} min"
        if hours
        else f"{minutes} min {seconds} s"
        if minutes
        else f"{seconds} s"
    )
    return f"{_when(started)} – {end} <span class='muted'>({length})</span>"


def _area(value: Any) -> str:
    if not _finite(value):
        return "–"
    return f"{value:,.0f} m² ({value / 10_000:,.2f} ha)"


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


def _image_uri(data: bytes) -> str:
    data = _fitted(data)
    kind = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _fitted(data: bytes) -> bytes:
    """The image as it is when it is small enough for a page, else a smaller JPEG of it: a
    report of a few dozen 20 MP frames would otherwise weigh hundreds of megabytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) <= MAX_IMAGE_PX:
                return data
            image.draft("RGB", (MAX_IMAGE_PX, MAX_IMAGE_PX))  # JPEG: decode at a fraction
            smaller = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return data  # not an image Pillow reads: shown as given, or as a broken image
    smaller.thumbnail((MAX_IMAGE_PX, MAX_IMAGE_PX), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    smaller.save(out, format="JPEG", quality=85)
    return out.getvalue()


# --- header ----------------------------------------------------------------------------------


def _header(
    heading: str, flight: Mapping[str, Any], jobs: Sequence[dict[str, Any]], generated_at: str
) -> str:
    frames = flight.get("frames", len(jobs))
    located = flight.get("located", sum(1 for job in jobs if _camera(job)))
    detections = sum(len(_detections(job)) for job in jobs)
    kind = "explicit" if flight.get("explicit") else "grouped by capture time and place"
    facts = [
        ("Flight", f"{_e(flight.get('id', ''))} <span class='muted'>({_e(kind)})</span>"),
        ("Time span", _span(flight.get("started"), flight.get("ended"))),
        ("Frames", _e(frames)),
        ("Located frames", _e(located)),
        ("Detections", _e(detections)),
        ("Area covered", _area(flight.get("area_m2"))),
        ("Generated", _when(generated_at)),
    ]
    items = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    return f'<header id="summary"><h1>{_e(heading)}</h1><dl class="facts">{items}</dl></header>'


# --- the map ---------------------------------------------------------------------------------


@dataclass
class _Layers:
    """What the map draws, in lon/lat, before the projection is known."""

    footprints: list[tuple[dict[str, Any], list[Point]]] = field(default_factory=list)
    path: list[Point] = field(default_factory=list)
    detections: list[tuple[dict[str, Any], dict[str, Any], Point, list[Point] | None]] = field(
        default_factory=list
    )
    changes: list[tuple[str, dict[str, Any], Point | None, Point]] = field(default_factory=list)

    def points(self) -> Iterable[Point]:
        for _, frame_ring in self.footprints:
            yield from frame_ring
        yield from self.path
        for _, _, centre, ring in self.detections:
            yield centre
            yield from ring or ()
        for _, _, before, after in self.changes:
            if before:
                yield before
            yield after


class _Projection:
    """Local east-north metres around a centre (pymap3d), scaled into the SVG's box with
    north up and equal scale on both axes."""

    def __init__(self, points: list[Point]) -> None:
        lons = [p[0] for p in points]
        lats = [p[1] for p in points]
        self.lat0 = (min(lats) + max(lats)) / 2
        self.lon0 = (min(lons) + max(lons)) / 2
        enu = self._enu(points)
        low, high = enu.min(axis=0), enu.max(axis=0)
        span = np.maximum(high - low, MIN_EXTENT_M)
        middle = (low + high) / 2
        inner_w = MAP_WIDTH - 2 * MAP_MARGIN
        self.scale = inner_w / span[0]  # SVG units per metre
        if span[1] * self.scale > MAP_MAX_HEIGHT - 2 * MAP_MARGIN:
            self.scale = (MAP_MAX_HEIGHT - 2 * MAP_MARGIN) / span[1]
        self.height = max(MAP_MIN_HEIGHT, math.ceil(span[1] * self.scale + 2 * MAP_MARGIN))
        self.middle = middle

    def _enu(self, points: Sequence[Point]) -> np.ndarray:
        lonlat = np.asarray(points, dtype=float).reshape(-1, 2)
        east, north, _ = pymap3d.geodetic2enu(
            lonlat[:, 1], lonlat[:, 0], 0.0, self.lat0, self.lon0, 0.0
        )
        return np.column_stack([np.atleast_1d(east), np.atleast_1d(north)])

    def xy(self, points: Sequence[Point]) -> list[tuple[float, float]]:
        enu = self._enu(points)
        x = MAP_WIDTH / 2 + (enu[:, 0] - self.middle[0]) * self.scale
        y = self.height / 2 - (enu[:, 1] - self.middle[1]) * self.scale
        return [(float(a), float(b)) for a, b in zip(x, y, strict=True)]

    def point(self, point: Point) -> tuple[float, float]:
        return self.xy([point])[0]


def _points_attr(xy: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)


def _collect(jobs: Sequence[dict[str, Any]], changes: dict[str, Any] | None) -> _Layers:
    layers = _Layers()
    for job in jobs:
        geo = _frame_geo(job)
        camera = _camera(job)
        if geo is None or camera is None:
            continue
        layers.path.append((float(camera["lon"]), float(camera["lat"])))
        ring = _ring(geo.get("footprint"))
        if ring:
            layers.footprints.append((job, ring))
        for detection in _detections(job):
            at = _detection_geo(detection)
            if at:
                centre = (float(at["lon"]), float(at["lat"]))
                layers.detections.append((job, detection, centre, _ring(at.get("footprint"))))
    for kind, entry, before, after in _change_marks(changes):
        layers.changes.append((kind, entry, before, after))
    return layers


def _map_section(
    jobs: Sequence[dict[str, Any]], colours: Mapping[str, str], changes: dict[str, Any] | None
) -> str:
    layers = _collect(jobs, changes)
    points = list(layers.points())
    if not points:
        return (
            '<section id="map-section"><h2>Map</h2><p id="map" class="empty">No frame of this '
            "flight could be placed on the ground, so there is no map.</p></section>"
        )
    projection = _Projection(points)
    svg = [
        f'<svg id="map" xmlns="{SVG_NS}" viewBox="0 0 {MAP_WIDTH} {projection.height}" '
        f'role="img" aria-label="Map of the flight">',
        f'<rect class="map-background" x="0" y="0" width="{MAP_WIDTH}" '
        f'height="{projection.height}"/>',
        _grid(projection),
        '<g class="footprints">',
    ]
    for job, frame_ring in layers.footprints:
        svg.append(
            f'<polygon class="frame-footprint" data-job="{_e(job.get("id"))}" '
            f'points="{_points_attr(projection.xy(frame_ring))}"><title>{_e(_name(job))}</title>'
            "</polygon>"
        )
    svg.append("</g>")
    if layers.path:
        xy = projection.xy(layers.path)
        svg.append(f'<polyline class="flight-path" points="{_points_attr(xy)}"/>')
        svg.extend(
            f'<circle class="camera-position" cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in xy
        )
        x, y = xy[0]
        svg.append(f'<rect class="flight-start" x="{x - 5:.1f}" y="{y - 5:.1f}" '
                   'width="10" height="10"><title>first frame</title></rect>')  # fmt: skip
    svg.append('<g class="detections">')
    for job, detection, centre, ring in layers.detections:
        label = str(detection.get("label", ""))
        colour = colours.get(label, "#555555")
        x, y = projection.point(centre)
        shape = (
            f'<polygon points="{_points_attr(projection.xy(ring))}" fill="{colour}" '
            f'stroke="{colour}"/>'
            if ring
            else ""
        )
        svg.append(
            f'<g class="detection" data-label="{_e(label)}" data-job="{_e(job.get("id"))}" '
            f'data-number="{_e(detection.get("number", ""))}">'
            f"<title>{_e(label)} #{_e(detection.get('number', ''))} in {_e(_name(job))}</title>"
            f'{shape}<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/></g>'
        )
    svg.append("</g>")
    if layers.changes:
        svg.append('<g class="changes">')
        svg.extend(_change_mark(projection, *mark) for mark in layers.changes)
        svg.append("</g>")
    svg.append(_scale_bar(projection))
    svg.append(_north_arrow())
    svg.append("</svg>")
    legend = _legend(colours, layers)
    return (
        '<section id="map-section"><h2>Map</h2><figure class="map">'
        + "".join(svg)
        + f"<figcaption>{legend}</figcaption></figure></section>"
    )


def _nice_length(metres: float) -> float:
    """The largest 1, 2 or 5 times a power of ten not above `metres`."""
    power = 10 ** math.floor(math.log10(metres))
    return max(step * power for step in (1, 2, 5) if step * power <= metres)


def _distance_text(metres: float) -> str:
    return f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"


def _grid(projection: _Projection) -> str:
    """Faint lines every scale-bar length, so distances read anywhere on the map."""
    step = _nice_length(MAP_WIDTH / projection.scale / 5) * projection.scale
    lines = [
        f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{projection.height}"/>'
        for x in np.arange(MAP_WIDTH / 2 % step, MAP_WIDTH, step)
    ]
    lines += [
        f'<line x1="0" y1="{y:.1f}" x2="{MAP_WIDTH}" y2="{y:.1f}"/>'
        for y in np.arange(projection.height / 2 % step, projection.height, step)
    ]
    return f'<g class="grid">{"".join(lines)}</g>'


def _scale_bar(projection: _Projection) -> str:
    metres = _nice_length(MAP_WIDTH / projection.scale / 5)
    length = metres * projection.scale
    x, y = 20.0, projection.height - 22.0
    half = length / 2
    return (
        f'<g id="scale-bar" class="scale-bar" transform="translate({x:.1f},{y:.1f})">'
        f'<rect class="plate" x="-8" y="-24" width="{length + 16:.1f}" height="36" rx="4"/>'
        f'<rect class="bar-dark" x="0" y="0" width="{half:.1f}" height="6"/>'
        f'<rect class="bar-light" x="{half:.1f}" y="0" width="{half:.1f}" height="6"/>'
        f'<text x="0" y="-6">0</text>'
        f'<text x="{length:.1f}" y="-6" text-anchor="end">{_distance_text(metres)}</text></g>'
    )


def _north_arrow() -> str:
    x, y = MAP_WIDTH - 36, 20
    return (
        f'<g id="north-arrow" class="north-arrow" transform="translate({x},{y})">'
        '<rect class="plate" x="-18" y="-8" width="36" height="62" rx="4"/>'
        '<polygon points="0,10 9,40 0,33 -9,40"/>'
        '<text x="0" y="52" text-anchor="middle">N</text></g>'
    )


def _legend(colours: Mapping[str, str], layers: _Layers) -> str:
    items = [
        f"<li>{_swatch(colour)}{_e(label)}</li>"
        for label, colour in colours.items()
        if any(d.get("label") == label for _, d, _, _ in layers.detections)
    ]
    items.append('<li><span class="swatch footprint"></span>frame on the ground</li>')
    if layers.path:
        items.append(
            '<li><span class="swatch path"></span>flight path (camera positions in capture '
            "order; square: first frame)</li>"
        )
    kinds = {kind for kind, *_ in layers.changes}
    for kind, text in (
        ("new", "&#9650; new since the earlier flight"),
        ("gone", "&#10005; gone since the earlier flight"),
        ("moved", "&#10230; moved (from earlier position)"),
    ):
        if kind in kinds:
            items.append(f'<li><span style="color:{CHANGE_COLOURS[kind]}">{text}</span></li>')
    return f'<ul class="legend" id="map-legend">{"".join(items)}</ul>'


# --- changes ---------------------------------------------------------------------------------


def _position(value: Any) -> Point | None:
    if isinstance(value, dict) and _is_point(value):
        return (float(value["lon"]), float(value["lat"]))
    return None


def _change_entries(changes: Mapping[str, Any] | None, kind: str) -> list[dict[str, Any]]:
    entries = changes.get(kind) if changes else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _change_marks(
    changes: Mapping[str, Any] | None,
) -> Iterable[tuple[str, dict[str, Any], Point | None, Point]]:
    """(kind, entry, earlier position for a move, position) for each drawable change."""
    for kind in ("new", "gone"):
        for entry in _change_entries(changes, kind):
            side = "after" if kind == "new" else "before"
            at = _position(entry) or _position(entry.get(side))
            if at:
                yield kind, entry, None, at
    for entry in _change_entries(changes, "moved"):
        before, after = _position(entry.get("before")), _position(entry.get("after"))
        after = after or _position(entry)
        if after:
            yield "moved", entry, before, after


def _change_mark(
    projection: _Projection, kind: str, entry: dict[str, Any], before: Point | None, at: Point
) -> str:
    x, y = projection.point(at)
    colour = CHANGE_COLOURS[kind]
    label = _e(entry.get("label", ""))
    title = f"<title>{_e(kind)}: {label}</title>"
    head = f'<g class="change change-{kind}" data-label="{label}">{title}'
    if kind == "new":
        triangle = _points_attr([(x, y - 9), (x + 8, y + 6), (x - 8, y + 6)])
        return (
            f'{head}<polygon points="{triangle}" fill="{colour}" stroke="#fff" '
            'stroke-width="1.5"/></g>'
        )
    if kind == "gone":
        cross = (
            f"M{x - 7:.1f},{y - 7:.1f} L{x + 7:.1f},{y + 7:.1f} "
            f"M{x + 7:.1f},{y - 7:.1f} L{x - 7:.1f},{y + 7:.1f}"
        )
        return (
            f'{head}<path d="{cross}" stroke="#fff" stroke-width="6"/>'
            f'<path d="{cross}" stroke="{colour}" stroke-width="3.5"/></g>'
        )
    parts = [head]
    if before:
        bx, by = projection.point(before)
        angle = math.atan2(y - by, x - bx)
        tip = [(x, y)] + [
            (x - 11 * math.cos(angle + turn), y - 11 * math.sin(angle + turn))
            for turn in (0.45, -0.45)
        ]
        parts.append(
            f'<circle cx="{bx:.1f}" cy="{by:.1f}" r="4" fill="#fff" stroke="{colour}" '
            f'stroke-width="2"/><line x1="{bx:.1f}" y1="{by:.1f}" x2="{x:.1f}" y2="{y:.1f}" '
            f'stroke="{colour}" stroke-width="2.5"/>'
            f'<polygon points="{_points_attr(tip)}" fill="{colour}"/>'
        )
    else:
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{colour}"/>')
    parts.append("</g>")
    return "".join(parts)


def _ref(entry: Mapping[str, Any], side: str | None = None) -> str:
    """'job 12 #3' from an entry's job id and detection number (on `side` when nested)."""
    source = entry.get(side) if side else entry
    if not isinstance(source, dict):
        return "–"
    prefix = f"{side}_" if side else ""
    job = source.get("job_id", source.get("job", entry.get(f"{prefix}job_id")))
    number = source.get("number", entry.get(f"{prefix}number"))
    if job is None:
        return "–"
    return f"job {_e(job)}" + (f" #{_e(number)}" if number is not None else "")


def _changes_section(changes: Mapping[str, Any]) -> str:
    given = changes.get("counts")
    counts: dict[str, Any] = given if isinstance(given, dict) else {}
    tallies = [(kind, counts.get(kind, len(_change_entries(changes, kind)))) for kind in TALLIES]
    tally = "".join(
        f'<div class="tally tally-{kind}" data-kind="{kind}"><b>{_e(n)}</b> {TALLIES[kind]}</div>'
        for kind, n in tallies
        if n or kind in ("new", "gone", "moved")
    )
    rows = []
    for kind in ("new", "gone", "moved"):
        for entry in _change_entries(changes, kind):
            if kind == "moved":
                at = _position(entry.get("after")) or _position(entry)
                before, after = _ref(entry, "before"), _ref(entry, "after")
                moved = _num(entry.get("distance_m"))
            else:
                side = "after" if kind == "new" else "before"
                at = _position(entry) or _position(entry.get(side))
                nested = isinstance(entry.get(side), dict)
                ref = _ref(entry, side) if nested else _ref(entry)
                before, after = ("–", ref) if kind == "new" else (ref, "–")
                moved = "–"
            lat, lon = (_num(at[1], 6), _num(at[0], 6)) if at else ("–", "–")
            rows.append(
                f'<tr class="change-row" data-kind="{kind}">'
                f'<td><span class="kind kind-{kind}">{kind}</span></td>'
                f"<td>{_e(entry.get('label', ''))}</td><td class='n'>{lat}</td>"
                f"<td class='n'>{lon}</td><td class='n'>{moved}</td>"
                f"<td>{before}</td><td>{after}</td></tr>"
            )
    table = (
        "<table><thead><tr><th>Change</th><th>Label</th><th>Latitude</th><th>Longitude</th>"
        "<th>Moved m</th><th>Earlier flight</th><th>This flight</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No detection is new, gone or moved.</p>"
    )
    return (
        f'<section id="changes"><h2>What changed since the earlier flight</h2>'
        f'<div class="tallies">{tally}</div>{table}</section>'
    )


# --- labels, frames, answers, assumptions ----------------------------------------------------


def _labels_section(
    flight: Mapping[str, Any], jobs: Sequence[dict[str, Any]], colours: Mapping[str, str]
) -> str:
    counts = _label_counts(flight, jobs)
    located = Counter(
        str(d.get("label", "")) for job in jobs for d in _detections(job) if _detection_geo(d)
    )
    given = flight.get("sizes")
    sizes: dict[str, Any] = given if isinstance(given, dict) else {}
    rows = []
    for label in sorted(counts, key=lambda name: (-counts[name], name)):
        found = sizes.get(label)
        size: dict[str, Any] = found if isinstance(found, dict) else {}
        rows.append(
            f'<tr data-label="{_e(label)}"><td>{_swatch(colours.get(label, "#555"))}'
            f"{_e(label)}</td><td class='n'>{counts[label]}</td>"
            f"<td class='n'>{located.get(label, 0)}</td>"
            + "".join(f"<td class='n'>{_num(size.get(k))}</td>" for k in ("min", "median", "max"))
            + "</tr>"
        )
    body = "".join(rows) or '<tr><td colspan="6">No detections.</td></tr>'
    return (
        '<section id="labels"><h2>Counts and real sizes per label</h2>'
        '<table id="label-counts"><thead><tr><th>Label</th><th>Count</th><th>Located</th>'
        "<th>Smallest m</th><th>Median m</th><th>Largest m</th></tr></thead>"
        f"<tbody>{body}</tbody></table><p class='muted'>Count: every detection; located: those "
        "placed on the ground. Sizes are each located detection's longer side on the ground, in "
        "metres.</p></section>"
    )


def _located_text(job: Mapping[str, Any]) -> str:
    geo = _frame_geo(job)
    if geo is None:
        return '<span class="muted">no position computed</span>'
    if _camera(job) is None:
        return f'<span class="warn">not located: {_e(geo.get("reason", "unknown reason"))}</span>'
    return "located"


def _frame_list_section(jobs: Sequence[dict[str, Any]]) -> str:
    rows = []
    for index, job in enumerate(jobs, 1):
        camera = _camera(job) or {}
        geo = _frame_geo(job) or {}
        rows.append(
            f'<tr data-job="{_e(job.get("id"))}"><td class="n">{index}</td>'
            f"<td>{_e(_name(job))}</td><td>{_when(_input(job).get('captured_at'))}</td>"
            f"<td class='n'>{_num(camera.get('height_m'))}</td>"
            f"<td class='n'>{_num(camera.get('pitch'), 0)}</td>"
            f"<td class='n'>{_num(geo.get('gsd_cm'), 2)}</td>"
            f"<td class='n'>{len(_detections(job))}</td><td>{_located_text(job)}</td></tr>"
        )
    return (
        '<section id="frame-list"><h2>Frames</h2><table><thead><tr><th>#</th><th>Frame</th>'
        "<th>Captured</th><th>Height m</th><th>Pitch °</th><th>GSD cm/px</th>"
        "<th>Detections</th><th>Ground position</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _frames_section(
    jobs: Sequence[dict[str, Any]], frames: Mapping[int, bytes], colours: Mapping[str, str]
) -> str:
    sections = [
        _frame(job, frames.get(job["id"]) if isinstance(job.get("id"), int) else None, colours)
        for job in jobs
        if _detections(job)
    ]
    if not sections:
        return '<section id="frames"><h2>Frames with detections</h2><p>None.</p></section>'
    return '<div id="frames">' + "".join(sections) + "</div>"


def _frame(job: Mapping[str, Any], image: bytes | None, colours: Mapping[str, str]) -> str:
    geo = _frame_geo(job) or {}
    camera = _camera(job)
    facts = [("Captured", _when(_input(job).get("captured_at"))), ("Job", _e(job.get("id")))]
    if camera:
        facts += [
            ("GSD", f"{_num(geo.get('gsd_cm'), 2)} cm/px"),
            ("Camera", f"{_num(camera['lat'], 6)}, {_num(camera['lon'], 6)}"),
            ("Height", f"{_num(camera.get('height_m'))} m above ground"),
            (
                "Pitch / yaw",
                f"{_num(camera.get('pitch'), 0)}° / {_num(camera.get('yaw'), 0)}°",
            ),
            ("Uncertainty", f"± {_num(geo.get('uncertainty_m'))} m at the centre"),
        ]
    else:
        facts.append(("Ground position", _located_text(job)))
    items = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    picture = (
        f'<img class="annotated" alt="{_e(_name(job))} with its detections" '
        f'src="{_image_uri(image)}">'
        if image
        else '<p class="muted">No annotated image.</p>'
    )
    rows = []
    for detection in _detections(job):
        label = str(detection.get("label", ""))
        at = _detection_geo(detection)
        head = (
            f'<tr data-label="{_e(label)}"><td class="n">{_e(detection.get("number", ""))}</td>'
            f"<td>{_swatch(colours.get(label, '#555'))}{_e(label)}</td>"
        )
        if at:
            rows.append(
                head
                + f"<td class='n'>{_num(at['lat'], 6)}</td><td class='n'>{_num(at['lon'], 6)}</td>"
                + "".join(
                    f"<td class='n'>{_num(at.get(k), 2 if k != 'area_m2' else 1)}</td>"
                    for k in ("width_m", "height_m", "area_m2")
                )
                + f"<td class='n'>± {_num(at.get('uncertainty_m'))}</td></tr>"
            )
        else:
            geo_value = detection.get("geo")
            reason = geo_value.get("reason") if isinstance(geo_value, dict) else None
            rows.append(
                head
                + '<td colspan="6" class="muted">not located'
                + (f": {_e(reason)}" if reason else "")
                + "</td></tr>"
            )
    reasoning = _result(job).get("reasoning")
    said = (
        f'<div class="reasoning"><h4>Reasoning</h4><p>{_e(reasoning)}</p></div>'
        if isinstance(reasoning, str) and reasoning.strip()
        else ""
    )
    return (
        f'<section class="frame" id="frame-{_e(job.get("id"))}" data-job="{_e(job.get("id"))}">'
        f"<h2>Frame {_e(_name(job))}</h2><dl class='facts'>{items}</dl>{picture}"
        '<table class="frame-detections"><thead><tr><th>#</th><th>Label</th><th>Latitude</th>'
        "<th>Longitude</th><th>Width m</th><th>Height m</th><th>Area m²</th>"
        f"<th>Uncertainty m</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{said}"
        "</section>"
    )


def _answers_section(jobs: Sequence[dict[str, Any]]) -> str:
    answered = [
        (job, answer) for job in jobs if isinstance(answer := _result(job).get("answer"), dict)
    ]
    if not answered:
        return '<section id="answers"><h2>Structured answers</h2><p>None.</p></section>'
    columns: list[str] = []
    for _, answer in answered:
        columns += [str(k) for k in answer if str(k) not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = "".join(
        f'<tr data-job="{_e(job.get("id"))}"><td>{_e(_name(job))}</td>'
        + "".join(f"<td>{_cell(answer.get(c))}</td>" for c in columns)
        + "</tr>"
        for job, answer in answered
    )
    return (
        '<section id="answers"><h2>Structured answers</h2>'
        f'<table class="answers"><thead><tr><th>Frame</th>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


def _assumptions_section(jobs: Sequence[dict[str, Any]]) -> str:
    said: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for job in jobs:
        geo = _frame_geo(job)
        if geo is None:
            continue
        assumptions = geo.get("assumptions")
        if isinstance(assumptions, list):
            said.update(dict.fromkeys(str(a) for a in assumptions if a).keys())
        if _camera(job) is None and geo.get("reason"):
            reasons[str(geo["reason"])] += 1
    items = "".join(
        f"<li>{_e(text)} <span class='muted'>({n} frame{'s' if n != 1 else ''})</span></li>"
        for text, n in said.items()
    )
    unlocated = "".join(
        f"<li>{_e(text)} <span class='muted'>({n} frame{'s' if n != 1 else ''})</span></li>"
        for text, n in reasons.items()
    )
    return (
        '<section id="assumptions"><h2>Camera assumptions</h2>'
        + (f"<ul>{items}</ul>" if items else "<p>No frame states any.</p>")
        + (f"<h3>Frames not located</h3><ul>{unlocated}</ul>" if unlocated else "")
        + "</section>"
    )


STYLE = """
:root { --ink: #1d2430; --muted: #5f6b7a; --rule: #d5dbe3; --band: #f3f5f8; --accent: #0b5cad; }
* { box-sizing: border-box; }
html { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
body { margin: 0 auto; max-width: 1100px; padding: 24px 32px 48px; color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  "Liberation Sans", sans-serif; background: #fff; }
h1 { font-size: 26px; margin: 0 0 12px; letter-spacing: -0.01em; }
h2 { font-size: 19px; margin: 28px 0 10px; padding-bottom: 4px;
  border-bottom: 2px solid var(--accent); }
h3 { font-size: 15px; margin: 16px 0 6px; }
h4 { font-size: 13px; margin: 10px 0 4px; color: var(--muted); text-transform: uppercase;
  letter-spacing: 0.04em; }
header#summary { border-bottom: 1px solid var(--rule); padding-bottom: 12px; }
dl.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr));
  gap: 8px 18px; margin: 0; }
dl.facts div { background: var(--band); border-radius: 6px; padding: 6px 10px; }
dt { font-size: 11px; text-transform: uppercase; letter-spacing: 0.05em; color: var(--muted); }
dd { margin: 2px 0 0; font-weight: 600; overflow-wrap: anywhere; }
.muted { color: var(--muted); font-weight: 400; }
.warn { color: #a4461a; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 4px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--rule); padding: 4px 8px; text-align: left;
  vertical-align: top; overflow-wrap: break-word; }
th { background: var(--band); font-weight: 600; font-size: 12px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font: 12px/1.3 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  white-space: pre-wrap; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px;
  margin-right: 6px; vertical-align: -1px; border: 1px solid rgba(0,0,0,0.35); }
.swatch.footprint { background: rgba(11,92,173,0.12); border-color: #0b5cad; }
.swatch.path { background: none; border: none; border-top: 2px dashed #333; height: 0;
  vertical-align: 3px; }
figure.map { margin: 0; }
#map { display: block; width: 100%; height: auto; border: 1px solid var(--rule);
  border-radius: 6px; }
#map .map-background { fill: #fbfcfd; }
#map .grid line { stroke: #e7ebf0; stroke-width: 1; }
#map .frame-footprint { fill: rgba(11,92,173,0.08); stroke: #0b5cad; stroke-width: 1;
  stroke-opacity: 0.7; }
#map .flight-path { fill: none; stroke: #333; stroke-width: 1.6; stroke-dasharray: 5 4; }
#map .camera-position { fill: #333; }
#map .flight-start { fill: #fff; stroke: #333; stroke-width: 2; }
#map .detection polygon { fill-opacity: 0.35; stroke-width: 1.5; }
#map .detection circle { stroke: #fff; stroke-width: 1.5; }
#map .plate { fill: rgba(255,255,255,0.88); stroke: #c9d0d9; }
#map .bar-dark { fill: #1d2430; }
#map .bar-light { fill: #fff; stroke: #1d2430; }
#map text { font-size: 13px; fill: #1d2430; font-weight: 600; }
#map .north-arrow polygon { fill: #1d2430; }
.legend { list-style: none; padding: 0; margin: 8px 0 0; display: flex; flex-wrap: wrap;
  gap: 4px 18px; font-size: 12.5px; }
.tallies { display: flex; gap: 12px; margin: 6px 0 10px; }
.tally { background: var(--band); border-radius: 6px; padding: 6px 14px; }
.tally b { font-size: 18px; }
.kind { font-weight: 600; }
.kind-new { color: #1a9850; } .kind-gone { color: #d73027; } .kind-moved { color: #c0661a; }
section.frame { margin-top: 32px; }
img.annotated { display: block; max-width: 100%; height: auto; margin: 10px 0;
  border-radius: 4px; border: 1px solid var(--rule); }
.reasoning p { white-space: pre-wrap; margin: 0; }
footer.notes { margin-top: 36px; border-top: 1px solid var(--rule); padding-top: 8px;
  color: var(--muted); font-size: 12px; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  h1 { font-size: 18pt; }
  h2 { font-size: 13pt; break-after: avoid; }
  table { font-size: 8.5pt; }
  tr, dl.facts div, .legend li { break-inside: avoid; }
  thead { display: table-header-group; }
  #map { max-height: 235mm; }
  section.frame { break-before: page; margin-top: 0; }
  img.annotated { max-height: 150mm; width: auto; margin-left: auto; margin-right: auto; }
  code { font-size: 8pt; }
}
"""
