"""What changed between two flights: located detections matched by label and ground distance."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .flights import LocalPlane, as_mapping, finite, lonlat_ring

__all__ = ["KINDS", "Change", "Changes", "ObjectRef", "compare", "tolerance_m"]

# Every change kind, in the order they are reported.
KINDS = ("new", "gone", "moved", "same", "unseen", "unseen_before")


def tolerance_m(u_a: float, u_b: float, min_tolerance_m: float = 1.0) -> float:
    """How far apart two sightings of one still object may lie: two sigma of their combined error.

    Each position's 1-sigma horizontal uncertainty is independent of the other's, so the distance
    between two sightings of one object has sigma sqrt(u_a² + u_b²). The uncertainty is the
    radial RMS (service/geo/ground.py), so twice that keeps about 98 % of still objects, while
    a real move of a few metres stands out. The floor
    keeps near-perfect uncertainties from calling centimetre jitter a move.
    """
    return max(min_tolerance_m, 2.0 * math.hypot(u_a, u_b))


@dataclass(frozen=True)
class ObjectRef:
    """One located detection: which job and detection number, and where."""

    job_id: int
    number: int
    label: str
    lat: float
    lon: float
    uncertainty_m: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "number": self.number,
            "lat": round(self.lat, 7),
            "lon": round(self.lon, 7),
            "uncertainty_m": round(self.uncertainty_m, 2),
        }


@dataclass(frozen=True)
class Change:
    """One object's fate between the flights.

    covered_by names the other flight's frames whose footprints hold the spot: for gone, the after
    frames that saw the place empty; for new, the before frames that saw it without the object.
    """

    kind: str
    label: str
    before: ObjectRef | None = None
    after: ObjectRef | None = None
    distance_m: float | None = None
    tolerance_m: float | None = None
    covered_by: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind, "label": self.label}
        entry["before"] = self.before.to_dict() if self.before else None
        entry["after"] = self.after.to_dict() if self.after else None
        if self.distance_m is not None:
            entry["distance_m"] = round(self.distance_m, 2)
        if self.tolerance_m is not None:
            entry["tolerance_m"] = round(self.tolerance_m, 2)
        if self.kind in ("new", "gone"):
            entry["covered_by"] = list(self.covered_by)
        return entry


@dataclass
class Changes:
    """The comparison's outcome, one list per kind."""

    new: list[Change] = field(default_factory=list)
    gone: list[Change] = field(default_factory=list)
    moved: list[Change] = field(default_factory=list)
    same: list[Change] = field(default_factory=list)
    unseen: list[Change] = field(default_factory=list)
    unseen_before: list[Change] = field(default_factory=list)

    def of(self, kind: str) -> list[Change]:
        if kind not in KINDS:
            raise KeyError(kind)
        changes: list[Change] = getattr(self, kind)
        return changes

    def counts(self) -> dict[str, int]:
        return {kind: len(self.of(kind)) for kind in KINDS}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counts": self.counts()}
        for kind in KINDS:
            out[kind] = [change.to_dict() for change in self.of(kind)]
        return out

    def to_geojson(self) -> dict[str, Any]:
        """RFC 7946 FeatureCollection: a Point per new or gone object, a LineString per move."""
        features: list[dict[str, Any]] = []
        for kind in ("new", "gone", "moved"):
            for change in self.of(kind):
                ref = change.after if kind == "new" else change.before
                assert ref is not None
                properties: dict[str, Any] = {
                    "change": kind,
                    "label": change.label,
                    "before_job": change.before.job_id if change.before else None,
                    "before_number": change.before.number if change.before else None,
                    "after_job": change.after.job_id if change.after else None,
                    "after_number": change.after.number if change.after else None,
                }
                geometry: dict[str, Any]
                if kind == "moved":
                    assert change.before is not None and change.after is not None
                    geometry = {
                        "type": "LineString",
                        "coordinates": [_position(change.before), _position(change.after)],
                    }
                    properties["distance_m"] = (
                        round(change.distance_m, 2) if change.distance_m is not None else None
                    )
                else:
                    geometry = {"type": "Point", "coordinates": _position(ref)}
                features.append({"type": "Feature", "geometry": geometry, "properties": properties})
        return {"type": "FeatureCollection", "features": features}


def _position(ref: ObjectRef) -> list[float]:
    return [round(ref.lon, 7), round(ref.lat, 7)]


@dataclass
class _Side:
    objects: list[ObjectRef]
    frames: list[tuple[int, list[list[float]]]]


def _side(jobs: Sequence[Mapping[str, Any]]) -> _Side:
    """A flight's located detections and its frames' footprints."""
    objects: list[ObjectRef] = []
    frames: list[tuple[int, list[list[float]]]] = []
    for job in jobs:
        job_id = job.get("id")
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            continue
        result = as_mapping(job.get("result"))
        ring = lonlat_ring(as_mapping(result.get("geo")).get("footprint"))
        if ring:
            frames.append((job_id, ring))
        detections = result.get("detections")
        for index, detection in enumerate(detections if isinstance(detections, list) else []):
            detection = as_mapping(detection)
            geo = as_mapping(detection.get("geo"))
            lat, lon = finite(geo.get("lat")), finite(geo.get("lon"))
            if lat is None or lon is None:
                continue
            number = detection.get("number")
            objects.append(
                ObjectRef(
                    job_id=job_id,
                    number=number if isinstance(number, int) else index + 1,
                    label=str(detection.get("label", "")),
                    lat=lat,
                    lon=lon,
                    uncertainty_m=max(0.0, finite(geo.get("uncertainty_m")) or 0.0),
                )
            )
    return _Side(objects, frames)


def _near(a: np.ndarray, b: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (row in a, column in b, distance) pair at most reach metres apart."""
    found = cKDTree(a).query_ball_tree(cKDTree(b), reach)
    rows = np.array([r for r, cols in enumerate(found) for _ in cols], dtype=np.intp)
    cols = np.array([c for near in found for c in near], dtype=np.intp)
    gaps = a[rows] - b[cols]
    return rows, cols, np.hypot(gaps[:, 0], gaps[:, 1])


def _assign(rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, allowed: np.ndarray) -> list[int]:
    """The allowed edges of an optimal assignment: as many pairs as possible, then the least
    total cost among those, no row or column used twice.

    Objects only interact through allowed pairs, so each connected group of them is solved on
    its own small dense matrix: a survey with thousands of cars never builds a thousands-square
    one.
    """
    edges = np.flatnonzero(allowed)
    if not len(edges):
        return []
    height = int(rows.max()) + 1
    graph = coo_matrix(
        (np.ones(len(edges)), (rows[edges], cols[edges] + height)),
        shape=(height + int(cols.max()) + 1,) * 2,
    )
    _, group = connected_components(graph, directed=False)
    of_edge = group[rows[edges]]
    # Groups in the order of their first edge; a group of one edge is that pair, solved as is.
    order = np.argsort(of_edge, kind="stable")
    _, first, sizes = np.unique(of_edge[order], return_index=True, return_counts=True)
    chosen: list[int] = []
    for at in np.argsort(order[first], kind="stable").tolist():
        members = edges[order[first[at] : first[at] + sizes[at]]]
        if len(members) == 1:
            chosen.append(int(members[0]))
            continue
        local_rows, r_index = np.unique(rows[members], return_inverse=True)
        local_cols, c_index = np.unique(cols[members], return_inverse=True)
        # A missing pair costs more than every allowed pair together, so the optimum first
        # avoids missing pairs (most matches), then minimises the allowed distances.
        missing = float(cost[members].sum()) + 1.0
        matrix = np.full((len(local_rows), len(local_cols)), missing)
        edge_at = np.full(matrix.shape, -1, dtype=np.intp)
        matrix[r_index, c_index] = cost[members]
        edge_at[r_index, c_index] = members
        for r, c in zip(*linear_sum_assignment(matrix), strict=True):
            if edge_at[r, c] >= 0:
                chosen.append(int(edge_at[r, c]))
    return chosen


def compare(
    before: Sequence[Mapping[str, Any]],
    after: Sequence[Mapping[str, Any]],
    *,
    move_limit_m: float = 15.0,
    min_tolerance_m: float = 1.0,
) -> Changes:
    """Match the two flights' located detections of each label by ground distance.

    Matching runs per label in two rounds of optimal assignment (scipy's linear_sum_assignment,
    no object used twice; each round pairs as many objects as it can, then by the least total
    distance): first pairs within their tolerance (tolerance_m: two sigma of the
    combined uncertainty) become `same`, so a still object is never traded away for a move;
    then the rest pair up within move_limit_m as `moved`. An after-object left over is `new` only
    where the before flight's coverage (union of its frame footprints) holds it, else
    `unseen_before`; a before-object left over is `gone` only inside the after flight's coverage,
    else `unseen` — not re-imaged is not gone.
    """
    old, young = _side(before), _side(after)
    everything = old.objects + young.objects
    rings = [ring for _, ring in old.frames + young.frames]
    lons = [o.lon for o in everything] + [p[0] for ring in rings for p in ring]
    lats = [o.lat for o in everything] + [p[1] for ring in rings for p in ring]
    changes = Changes()
    if not lons:
        return changes
    plane = LocalPlane.around(lons, lats)

    def located(objects: list[ObjectRef]) -> np.ndarray:
        return plane.project([o.lon for o in objects], [o.lat for o in objects])

    old_xy, young_xy = located(old.objects), located(young.objects)
    # Where each object's spot was imaged by the other flight.
    seen_after = _holders(plane, young.frames, old_xy)
    seen_before = _holders(plane, old.frames, young_xy)

    for label in sorted({o.label for o in everything}):
        a = [i for i, o in enumerate(old.objects) if o.label == label]
        b = [j for j, o in enumerate(young.objects) if o.label == label]
        matched_a: set[int] = set()
        matched_b: set[int] = set()
        if a and b:
            u_a = np.array([old.objects[i].uncertainty_m for i in a])
            u_b = np.array([young.objects[j].uncertainty_m for j in b])
            reach = max(move_limit_m, min_tolerance_m, 2.0 * math.hypot(u_a.max(), u_b.max()))
            rows, cols, distance = _near(old_xy[a], young_xy[b], reach)
            tolerance = np.maximum(min_tolerance_m, 2.0 * np.hypot(u_a[rows], u_b[cols]))
            for still in (True, False):
                allowed = distance <= tolerance if still else distance <= move_limit_m
                allowed &= ~np.isin(rows, list(matched_a)) & ~np.isin(cols, list(matched_b))
                for e in _assign(rows, cols, distance, allowed):
                    r, c = int(rows[e]), int(cols[e])
                    matched_a.add(r)
                    matched_b.add(c)
                    kind = "same" if distance[e] <= tolerance[e] else "moved"
                    changes.of(kind).append(
                        Change(
                            kind=kind,
                            label=label,
                            before=old.objects[a[r]],
                            after=young.objects[b[c]],
                            distance_m=float(distance[e]),
                            tolerance_m=float(tolerance[e]),
                        )
                    )
        for r, i in enumerate(a):
            if r not in matched_a:
                seen_by = seen_after[i]
                kind = "gone" if seen_by else "unseen"
                changes.of(kind).append(
                    Change(kind, label, before=old.objects[i], covered_by=seen_by)
                )
        for c, j in enumerate(b):
            if c not in matched_b:
                seen_by = seen_before[j]
                kind = "new" if seen_by else "unseen_before"
                changes.of(kind).append(
                    Change(kind, label, after=young.objects[j], covered_by=seen_by)
                )

    for kind in KINDS:
        changes.of(kind).sort(key=_sort_key)
    return changes


def _holders(
    plane: LocalPlane, frames: list[tuple[int, list[list[float]]]], xy: np.ndarray
) -> list[tuple[int, ...]]:
    """For each point, the frames whose footprints hold it (the coverage holds it when any does)."""
    shapes = _shapes(plane, frames)
    kept = [k for k, g in enumerate(shapes) if not g.is_empty]
    held: list[set[int]] = [set() for _ in range(len(xy))]
    if kept and len(xy):
        footprints = np.array([shapes[k] for k in kept], dtype=object)
        shapely.prepare(footprints)
        points = shapely.points(xy)
        # The tree only narrows by bounding box: its own predicate query costs ~5x as much as
        # testing the candidates against the prepared footprints in one vectorised call.
        near, hits = shapely.STRtree(footprints).query(points)
        inside = shapely.covers(footprints[hits], points[near])  # prepared: the first
        for point, hit in zip(near[inside].tolist(), hits[inside].tolist(), strict=True):
            held[point].add(frames[kept[hit]][0])
    return [tuple(sorted(jobs)) for jobs in held]


def _shapes(plane: LocalPlane, frames: list[tuple[int, list[list[float]]]]) -> list[Any]:
    """Each frame's footprint in plane metres, as LocalPlane.union([ring]) makes it, with every
    ring projected in one call and the rest vectorised."""
    if not frames:
        return []
    lengths = [len(ring) for _, ring in frames]
    xy = plane.project(
        [p[0] for _, ring in frames for p in ring], [p[1] for _, ring in frames for p in ring]
    )
    shapes = shapely.polygons(
        shapely.linearrings(xy, indices=np.repeat(np.arange(len(frames)), lengths))
    )
    broken = ~shapely.is_valid(shapes)
    # A footprint whose corners came out crossed still covers its valid part.
    shapes[broken] = shapely.make_valid(shapes[broken])
    united: list[Any] = shapely.union_all(shapes[:, np.newaxis], axis=1).tolist()
    return united


def _sort_key(change: Change) -> tuple[str, int, int, int, int]:
    a, b = change.before, change.after
    return (
        change.label,
        a.job_id if a else -1,
        a.number if a else -1,
        b.job_id if b else -1,
        b.number if b else -1,
    )
