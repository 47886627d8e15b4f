"""Rays from a Camera onto flat ground: WGS84 points, footprints, sizes, GSD, uncertainty."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
        return (
            f"meets the ground {reach / 1000:.1f} km away, beyond the "
            f"{MAX_RANGE_M / 1000:g} km the flat-ground model is used to"
        )
    return east, north


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
    base = hit(camera, x, y, limit=False)
    if isinstance(base, str):
        return None
    total = camera.sigma_position_m**2
    total += (math.hypot(*base) * camera.sigma_height_m / camera.height_m) ** 2
    rotation = camera.rotation()
    sigma = camera.sigma_attitude_deg
    for axis in range(3):
        both = [
            hit(camera, x, y, limit=False, rotation=rotation @ _turn(axis, t))
            for t in (sigma, -sigma)
        ]
        points = [p for p in both if not isinstance(p, str)]
        if len(points) == 2:
            total += max(_distance(base, p) for p in points) ** 2
            continue
        # A whole sigma turns the ray off the ground (near the horizon): first order instead.
        small = hit(camera, x, y, limit=False, rotation=rotation @ _turn(axis, sigma * 1e-3))
        if isinstance(small, str):
            return None
        total += (_distance(base, small) * 1e3) ** 2
    return math.sqrt(total)


def _signed_area(points: Sequence[Ground]) -> float:
    return 0.5 * sum(
        a[0] * b[1] - b[0] * a[1] for a, b in zip(points, [*points[1:], points[0]], strict=True)
    )


def _ring(camera: Camera, points: Sequence[Ground]) -> list[list[float]]:
    """A closed, counter-clockwise [lon, lat] ring (GeoJSON's right-hand rule)."""
    if _signed_area(points) < 0:
        points = list(reversed(points))
    ring = []
    for point in points:
        lat, lon = to_wgs84(camera, point)
        ring.append([round(lon, 7), round(lat, 7)])
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
    numbers = _numbers(box)
    if numbers is None:
        return {"reason": "the box is not four finite numbers"}
    x1, x2 = sorted(numbers[0::2])
    y1, y2 = sorted(numbers[1::2])
    centre = hit(camera, (x1 + x2) / 2, (y1 + y2) / 2)
    if isinstance(centre, str):
        return {"reason": f"the box centre {centre}"}
    lat, lon = to_wgs84(camera, centre)
    corners = [hit(camera, x, y) for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))]
    sizes: dict[str, Any] = {"footprint": None, "width_m": None, "height_m": None, "area_m2": None}
    points = [c for c in corners if not isinstance(c, str)]
    if len(points) == 4:
        top_left, top_right, bottom_right, bottom_left = points
        width = (_distance(top_left, top_right) + _distance(bottom_left, bottom_right)) / 2
        height = (_distance(top_left, bottom_left) + _distance(top_right, bottom_right)) / 2
        sizes = {
            "footprint": _ring(camera, points),
            "width_m": round(width, 2),
            "height_m": round(height, 2),
            "area_m2": round(abs(_signed_area(points)), 2),
        }
    sigma = uncertainty(camera, (x1 + x2) / 2, (y1 + y2) / 2)
    return {
        "lat": round(lat, 7),
        "lon": round(lon, 7),
        **sizes,
        "distance_m": round(math.hypot(*centre, camera.height_m), 2),
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
    width, height = camera.image_size
    x, y = width / 2, height / 2
    centre = hit(camera, x, y)
    gsd_cm = None
    sigma = None
    located = None
    if not isinstance(centre, str):
        lat, lon = to_wgs84(camera, centre)
        located = {"lat": round(lat, 7), "lon": round(lon, 7)}
        # The square root of the ground area one pixel covers at the centre.
        left, right = hit(camera, x - 0.5, y, limit=False), hit(camera, x + 0.5, y, limit=False)
        top, bottom = hit(camera, x, y - 0.5, limit=False), hit(camera, x, y + 0.5, limit=False)
        if not (
            isinstance(left, str)
            or isinstance(right, str)
            or isinstance(top, str)
            or isinstance(bottom, str)
        ):
            gsd = math.sqrt(_distance(left, right) * _distance(top, bottom))
            gsd_cm = round(100 * gsd, 3)
        sigma = uncertainty(camera, x, y)
    seen = footprint(camera)
    return {
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
        "footprint": None if seen is None else _ring(camera, seen),
        "gsd_cm": gsd_cm,
        "uncertainty_m": None if sigma is None else round(sigma, 2),
    }
