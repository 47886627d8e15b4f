"""The report's SVG map: given layers in lon/lat, projects them around their centre and draws
footprints, flight path, detections, change marks, scale bar, north arrow and legend."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np
import pymap3d

SVG_NS = "http://www.w3.org/2000/svg"
MAP_WIDTH = 1000  # SVG user units; the SVG scales to the page
MAP_MIN_HEIGHT = 420
MAP_MAX_HEIGHT = 1000
MAP_MARGIN = 48
MIN_EXTENT_M = 50.0  # a single point still gets a map with a readable scale
CHANGE_COLOURS = {"new": "#1a9850", "gone": "#d73027", "moved": "#f28e2b"}
Point = tuple[float, float]  # lon, lat


@dataclass(frozen=True)
class Footprint:
    """A frame's outline on the ground."""

    job: Any  # the job's id as given
    frame: str  # the frame's name
    ring: list[Point]


@dataclass(frozen=True)
class DetectionMark:
    """A located detection: its centre and, when known, its outline on the ground."""

    job: Any
    frame: str
    detection: Mapping[str, Any]
    centre: Point
    ring: list[Point] | None


@dataclass(frozen=True)
class ChangeMark:
    """A change since an earlier flight; `before` is the earlier position of a move."""

    kind: str  # new, gone or moved
    label: Any
    before: Point | None
    at: Point


@dataclass
class Layers:
    """What the map draws, in lon/lat, before the projection is known."""

    footprints: list[Footprint] = field(default_factory=list)
    path: list[Point] = field(default_factory=list)  # camera positions in capture order
    detections: list[DetectionMark] = field(default_factory=list)
    changes: list[ChangeMark] = field(default_factory=list)

    def points(self) -> Iterable[Point]:
        for footprint in self.footprints:
            yield from footprint.ring
        yield from self.path
        for mark in self.detections:
            yield mark.centre
            yield from mark.ring or ()
        for change in self.changes:
            if change.before:
                yield change.before
            yield change.at


def swatch(colour: str) -> str:
    """A small square of `colour`, as the legend and the report's tables show a label."""
    return f'<span class="swatch" style="background:{colour}"></span>'


def map_section(layers: Layers, colours: Mapping[str, str]) -> str:
    """The map section of the report; `colours` maps a label to its colour."""
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
    for footprint in layers.footprints:
        svg.append(
            f'<polygon class="frame-footprint" data-job="{_e(footprint.job)}" '
            f'points="{_points_attr(projection.xy(footprint.ring))}">'
            f"<title>{_e(footprint.frame)}</title></polygon>"
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
    svg.extend(_detection_mark(projection, mark, colours) for mark in layers.detections)
    svg.append("</g>")
    if layers.changes:
        svg.append('<g class="changes">')
        svg.extend(_change_mark(projection, change) for change in layers.changes)
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


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _points_attr(xy: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)


def _detection_mark(
    projection: _Projection, mark: DetectionMark, colours: Mapping[str, str]
) -> str:
    label = str(mark.detection.get("label", ""))
    number = mark.detection.get("number", "")
    colour = colours.get(label, "#555555")
    x, y = projection.point(mark.centre)
    shape = (
        f'<polygon points="{_points_attr(projection.xy(mark.ring))}" fill="{colour}" '
        f'stroke="{colour}"/>'
        if mark.ring
        else ""
    )
    return (
        f'<g class="detection" data-label="{_e(label)}" data-job="{_e(mark.job)}" '
        f'data-number="{_e(number)}">'
        f"<title>{_e(label)} #{_e(number)} in {_e(mark.frame)}</title>"
        f'{shape}<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/></g>'
    )


def _change_mark(projection: _Projection, change: ChangeMark) -> str:
    kind = change.kind
    x, y = projection.point(change.at)
    colour = CHANGE_COLOURS[kind]
    label = _e(change.label)
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
    if change.before:
        bx, by = projection.point(change.before)
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


def _legend(colours: Mapping[str, str], layers: Layers) -> str:
    items = [
        f"<li>{swatch(colour)}{_e(label)}</li>"
        for label, colour in colours.items()
        if any(mark.detection.get("label") == label for mark in layers.detections)
    ]
    items.append('<li><span class="swatch footprint"></span>frame on the ground</li>')
    if layers.path:
        items.append(
            '<li><span class="swatch path"></span>flight path (camera positions in capture '
            "order; square: first frame)</li>"
        )
    kinds = {change.kind for change in layers.changes}
    for kind, text in (
        ("new", "&#9650; new since the earlier flight"),
        ("gone", "&#10005; gone since the earlier flight"),
        ("moved", "&#10230; moved (from earlier position)"),
    ):
        if kind in kinds:
            items.append(f'<li><span style="color:{CHANGE_COLOURS[kind]}">{text}</span></li>')
    return f'<ul class="legend" id="map-legend">{"".join(items)}</ul>'
