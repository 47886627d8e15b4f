"""Rays from a Camera onto flat ground: WGS84 points, footprints, sizes, GSD, uncertainty."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import pymap3d

from service.geo.camera import Camera

# Beyond this the flat-ground model is not used (the earth's curvature alone drops the ground by
# 0.3 m at 2 km, and a ray that grazes the ground turns small attitude errors into large ones).
MAX_RANGE_M = 2000.0
_CIRCLE_SIDES = 72

Ground = tuple[float, float]  # east, north in metres from the point beneath the camera


def hit(
    camera: Camera, x: float, y: float, *, limit: bool = True, rotation: np.ndarray | None = None
) -> Ground | str:
    """Where the ray through upright-image point (x, y) meets the ground, or the rest of a
    sentence saying why it does not ("is above the horizon")."""
    direction = camera.ray(x, y, rotation)
    down = -float(direction[2])
    if not down > 1e-9:
        return "is at or above the horizon"
    scale = camera.height_m / down
    east, north = float(direction[0]) * scale, float(direction[1]) * scale
    reach = math.hypot(east, north)
    if limit and reach > MAX_RANGE_M:
        return _too_far(reach)
    return east, north


def _cast(
    camera: Camera, xs: np.ndarray, ys: np.ndarray, turns: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`hit` for many points under each of K rotations at once, unlimited: (east, north, below
    the horizon), each K x N."""
    u, v = camera.to_sensor(xs, ys)
    plane = np.column_stack(
        [(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones(len(u))]
    )
    direction = plane @ np.swapaxes(turns, 1, 2)
    direction /= np.linalg.norm(direction, axis=2, keepdims=True)
    down = -direction[..., 2]
    below = down > 1e-9
    scale = camera.height_m / np.where(below, down, 1.0)
    with np.errstate(over="ignore"):  # an absurd height reaches infinity, as plain floats do
        return direction[..., 0] * scale, direction[..., 1] * scale, below


def to_wgs84(camera: Camera, point: Ground) -> tuple[float, float]:
    """(lat, lon) degrees of a ground point (WGS84, by pymap3d)."""
    lat, lon, _ = pymap3d.enu2geodetic(
        point[0], point[1], 0.0, camera.lat, camera.lon, camera.ground_altitude_m
    )
    return float(lat), float(lon)


def locate_pixel(camera: Camera, x: float, y: float) -> tuple[float, float] | str:
    """(lat, lon) of the ground seen at upright-image point (x, y), or why there is none."""
    found = hit(camera, x, y)
    if isinstance(found, str):
        return f"the pixel {found}"
    return to_wgs84(camera, found)


def _distance(a: Ground, b: Ground) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def _turn(axis: int, degrees: float) -> np.ndarray:
    """A rotation about one camera axis (0: x right, 1: y down, 2: the optical axis)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    turn = np.eye(3)
    turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
    return turn


def uncertainty(camera: Camera, x: float, y: float) -> float | None:
    """1-sigma horizontal error of the ground point at (x, y), root-sum-square of the stated
    sources: position (moves every point by its sigma); height (scales the point's distance
    from beneath the camera); attitude, turned by its sigma both ways about each of the camera's
    own axes (free of the gimbal lock of yaw/pitch/roll at nadir), the larger displacement kept."""
    return _uncertainties(camera, np.array([x], dtype=float), np.array([y], dtype=float))[0]


def _uncertainties(camera: Camera, xs: np.ndarray, ys: np.ndarray) -> list[float | None]:
    """`uncertainty` of many points at once, all of them under every perturbation in one cast."""
    rotation = camera.rotation()
    sigma = camera.sigma_attitude_deg
    turns = [rotation] + [rotation @ _turn(axis, t) for axis in range(3) for t in (sigma, -sigma)]
    east, north, below = _cast(camera, xs, ys, np.array(turns))
    # Every point is perturbed, also those whose own ground point is not used; an absurd height
    # (1e300 m) overflows there, and a sigma that is not finite is no sigma.
    with np.errstate(over="ignore", invalid="ignore"):
        moved = np.hypot(east[0] - east[1:], north[0] - north[1:])  # 6 x N: per axis, + then -
        total = (
            camera.sigma_position_m**2
            + (np.hypot(east[0], north[0]) * camera.sigma_height_m / camera.height_m) ** 2
        )
        failed = ~below[0]
        for axis in range(3):
            on_ground = below[0] & below[1 + 2 * axis] & below[2 + 2 * axis]
            attitude = np.maximum(moved[2 * axis], moved[2 * axis + 1]) ** 2
            off = below[0] & ~on_ground
            if off.any():
                # A whole sigma turns the ray off the ground (near the horizon): first order.
                small = np.array([rotation @ _turn(axis, sigma * 1e-3)])
                e, n, ok = _cast(camera, xs, ys, small)
                gap = np.hypot(east[0] - e[0], north[0] - n[0]) * 1e3
                attitude = np.where(off, gap**2, attitude)
                failed |= off & ~ok[0]
            total = total + np.where(on_ground | off, attitude, 0.0)
        root = np.sqrt(total)
        failed |= ~np.isfinite(root)
    return [None if bad else float(value) for bad, value in zip(failed, root, strict=True)]


def _signed_area(points: Sequence[Ground]) -> float:
    return 0.5 * sum(
        a[0] * b[1] - b[0] * a[1] for a, b in zip(points, [*points[1:], points[0]], strict=True)
    )


def _counter_clockwise(points: Sequence[Ground]) -> list[Ground]:
    """The ring's corners in GeoJSON's right-hand order."""
    return list(reversed(points)) if _signed_area(points) < 0 else list(points)


class _Places:
    """Ground points gathered from a whole frame for one vectorised WGS84 conversion
    (pymap3d's per-call overhead dwarfs its maths on a single point)."""

    def __init__(self, camera: Camera) -> None:
        self.camera = camera
        self.points: list[Ground] = []
        self.lat: list[float] = []
        self.lon: list[float] = []

    def add(self, points: Sequence[Ground]) -> int:
        """Where the points start among the converted ones."""
        self.points.extend(points)
        return len(self.points) - len(points)

    def convert(self) -> None:
        if not self.points:
            return
        ground = np.array(self.points, dtype=float)
        lat, lon, _ = pymap3d.enu2geodetic(
            ground[:, 0],
            ground[:, 1],
            0.0,
            self.camera.lat,
            self.camera.lon,
            self.camera.ground_altitude_m,
        )
        self.lat, self.lon = np.atleast_1d(lat).tolist(), np.atleast_1d(lon).tolist()

    def ring(self, start: int, count: int) -> list[list[float]]:
        """A closed [lon, lat] ring of `count` converted points."""
        ring = [[round(self.lon[k], 7), round(self.lat[k], 7)] for k in range(start, start + count)]
        return [*ring, ring[0]]


def _numbers(box: Any) -> list[float] | None:
    if not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4:
        return None
    out = []
    for value in box:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value):
            return None
        out.append(float(value))
    return out


def box_geo(camera: Camera, box: Any) -> dict[str, Any]:
    """DETECTION_GEO (see GEO shapes) of a box [x1, y1, x2, y2] in upright-image pixels."""
    return locate(camera, [box])[1][0]


def _too_far(reach: float) -> str:
    return (
        f"meets the ground {reach / 1000:.1f} km away, beyond the "
        f"{MAX_RANGE_M / 1000:g} km the flat-ground model is used to"
    )


class _Cast:
    """Many upright-image points cast onto the ground at once (`hit`, as plain floats)."""

    def __init__(self, camera: Camera, xs: np.ndarray, ys: np.ndarray) -> None:
        east, north, below = _cast(camera, xs, ys, camera.rotation()[np.newaxis])
        self.east, self.north, self.below = east[0].tolist(), north[0].tolist(), below[0].tolist()

    def unlimited(self, k: int) -> Ground | str:
        if not self.below[k]:
            return "is at or above the horizon"
        return self.east[k], self.north[k]

    def ground(self, k: int) -> Ground | str:
        found = self.unlimited(k)
        if isinstance(found, str):
            return found
        reach = math.hypot(*found)
        return _too_far(reach) if reach > MAX_RANGE_M else found


def _spans(boxes: Sequence[Any]) -> tuple[list[list[float] | None], np.ndarray]:
    """Each box's four numbers (None when it has none), and its x1, x2, y1, y2 sorted (N x 4)."""
    numbers = [_numbers(box) for box in boxes]
    spans = np.array(
        [[*sorted(n[0::2]), *sorted(n[1::2])] if n is not None else [0.0] * 4 for n in numbers],
        dtype=float,
    ).reshape(-1, 4)
    return numbers, spans


def _box(
    camera: Camera,
    numbers: list[float] | None,
    cast: _Cast,
    at: int,
    sigma: float | None,
    places: _Places,
) -> Callable[[], dict[str, Any]]:
    """A box's DETECTION_GEO, to be built once `places` holds its WGS84 points; `at`: where its
    centre and then corners top-left, top-right, bottom-right, bottom-left are in `cast`."""
    if numbers is None:
        return partial(dict, reason="the box is not four finite numbers")
    centre = cast.ground(at)
    if isinstance(centre, str):
        return partial(dict, reason=f"the box centre {centre}")
    corners = [cast.ground(at + k) for k in range(1, 5)]
    points = [c for c in corners if not isinstance(c, str)]
    ring = _counter_clockwise(points) if len(points) == 4 else []
    return partial(
        _box_dict,
        places,
        centre,
        places.add([centre]),
        points,
        places.add(ring),
        sigma,
        camera.height_m,
    )


def _box_dict(
    places: _Places,
    centre: Ground,
    at: int,
    points: list[Ground],
    ring_at: int,
    sigma: float | None,
    height_m: float,
) -> dict[str, Any]:
    sizes: dict[str, Any] = {"footprint": None, "width_m": None, "height_m": None, "area_m2": None}
    if len(points) == 4:
        top_left, top_right, bottom_right, bottom_left = points
        width = (_distance(top_left, top_right) + _distance(bottom_left, bottom_right)) / 2
        height = (_distance(top_left, bottom_left) + _distance(top_right, bottom_right)) / 2
        sizes = {
            "footprint": places.ring(ring_at, 4),
            "width_m": round(width, 2),
            "height_m": round(height, 2),
            "area_m2": round(abs(_signed_area(points)), 2),
        }
    return {
        "lat": round(places.lat[at], 7),
        "lon": round(places.lon[at], 7),
        **sizes,
        "distance_m": round(math.hypot(*centre, height_m), 2),
        "uncertainty_m": None if sigma is None else round(sigma, 2),
    }


def _clip(polygon: list[Ground], a: float, b: float, c: float) -> list[Ground]:
    """The part of a convex polygon where a*east + b*north + c >= 0 (Sutherland-Hodgman)."""
    out: list[Ground] = []
    for i, current in enumerate(polygon):
        previous = polygon[i - 1]
        f_current = a * current[0] + b * current[1] + c
        f_previous = a * previous[0] + b * previous[1] + c
        if (f_current >= 0) != (f_previous >= 0):
            t = f_previous / (f_previous - f_current)
            out.append(
                (
                    previous[0] + t * (current[0] - previous[0]),
                    previous[1] + t * (current[1] - previous[1]),
                )
            )
        if f_current >= 0:
            out.append(current)
    return out


def footprint(camera: Camera) -> list[Ground] | None:
    """The ground the image sees, within MAX_RANGE_M of the camera: a disc clipped by the four
    planes through the camera and the image edges (the part below the horizon, exactly)."""
    polygon: list[Ground] = [
        (
            MAX_RANGE_M * math.cos(2 * math.pi * k / _CIRCLE_SIDES),
            MAX_RANGE_M * math.sin(2 * math.pi * k / _CIRCLE_SIDES),
        )
        for k in range(_CIRCLE_SIDES)
    ]
    rotation = camera.rotation()
    w, h = camera.sensor_width, camera.sensor_height
    # Inside the image: u >= 0, u <= w, v >= 0, v <= h, each linear in the camera-frame ray.
    edges = [
        (camera.fx, 0.0, camera.cx),
        (-camera.fx, 0.0, w - camera.cx),
        (0.0, camera.fy, camera.cy),
        (0.0, -camera.fy, h - camera.cy),
    ]
    for edge in edges:
        normal = rotation @ np.array(edge)  # the constraint on an east-north-up direction
        a, b, c = float(normal[0]), float(normal[1]), -float(normal[2]) * camera.height_m
        polygon = _clip(polygon, a, b, c)
        if len(polygon) < 3:
            return None
    kept: list[Ground] = []
    for point in polygon:
        if not kept or _distance(point, kept[-1]) > 1e-3:
            kept.append(point)
    if len(kept) > 3 and _distance(kept[0], kept[-1]) <= 1e-3:
        kept.pop()
    return kept if len(kept) >= 3 and abs(_signed_area(kept)) > 1e-6 else None


def frame_geo(camera: Camera) -> dict[str, Any]:
    """FRAME_GEO (see GEO shapes) of a located frame."""
    return locate(camera, [])[0]


def locate(camera: Camera, boxes: Sequence[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(FRAME_GEO, [DETECTION_GEO per box]) of a located frame: every point of the frame and its
    boxes cast onto the ground in one array, their uncertainties perturbed together, and the
    ground points converted to WGS84 in one call."""
    width, height = camera.image_size
    x, y = width / 2, height / 2
    numbers, spans = _spans(boxes)
    x1, x2, y1, y2 = spans.T
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # The image centre and the four half-pixel steps around it, then per box its centre and
    # corners top-left, top-right, bottom-right, bottom-left.
    cast = _Cast(
        camera,
        np.concatenate(
            [[x, x - 0.5, x + 0.5, x, x], np.column_stack([cx, x1, x2, x2, x1]).ravel()]
        ),
        np.concatenate(
            [[y, y, y, y - 0.5, y + 0.5], np.column_stack([cy, y1, y1, y2, y2]).ravel()]
        ),
    )
    sigmas = _uncertainties(camera, np.concatenate([[x], cx]), np.concatenate([[y], cy]))
    places = _Places(camera)
    centre = cast.ground(0)
    gsd_cm = None
    sigma = None
    centre_at = None
    if not isinstance(centre, str):
        centre_at = places.add([centre])
        # The square root of the ground area one pixel covers at the centre.
        left, right, top, bottom = (cast.unlimited(k) for k in range(1, 5))
        if not (
            isinstance(left, str)
            or isinstance(right, str)
            or isinstance(top, str)
            or isinstance(bottom, str)
        ):
            gsd = math.sqrt(_distance(left, right) * _distance(top, bottom))
            gsd_cm = round(100 * gsd, 3)
        sigma = sigmas[0]
    seen = footprint(camera)
    seen_at = None if seen is None else places.add(_counter_clockwise(seen))
    detections = [
        _box(camera, n, cast, 5 + 5 * i, sigmas[1 + i], places) for i, n in enumerate(numbers)
    ]
    places.convert()
    located = None
    if centre_at is not None:
        located = {"lat": round(places.lat[centre_at], 7), "lon": round(places.lon[centre_at], 7)}
    frame = {
        "camera": {
            "lat": round(camera.lat, 7),
            "lon": round(camera.lon, 7),
            "height_m": round(camera.height_m, 2),
            "yaw": camera.yaw,
            "pitch": camera.pitch,
            "roll": camera.roll,
            "focal_px": round(camera.fx, 2),
            "sensor_width_mm": None
            if camera.sensor_width_mm is None
            else round(camera.sensor_width_mm, 2),
            "model": camera.model,
        },
        "assumptions": list(camera.assumptions),
        "centre": located,
        "footprint": None if seen is None or seen_at is None else places.ring(seen_at, len(seen)),
        "gsd_cm": gsd_cm,
        "uncertainty_m": None if sigma is None else round(sigma, 2),
    }
    return frame, [build() for build in detections]
