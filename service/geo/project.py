"""Ground to image, the inverse of ground.py: where a point on a Camera's flat ground appears in
the upright image."""

from __future__ import annotations

import numpy as np
import pymap3d

from service.geo.camera import Camera


def from_sensor(camera: Camera, u: float, v: float) -> tuple[float, float]:
    """A point of the sensor image in upright-image pixels (EXIF orientation 1..8 applied): the
    inverse of Camera.to_sensor."""
    w, h = camera.sensor_width, camera.sensor_height
    return {
        1: (u, v),
        2: (w - u, v),
        3: (w - u, h - v),
        4: (u, h - v),
        5: (v, u),
        6: (h - v, u),
        7: (h - v, w - u),
        8: (v, w - u),
    }.get(camera.orientation, (u, v))


def ground_offset(camera: Camera, lat: float, lon: float) -> tuple[float, float]:
    """(east, north) metres from the point beneath the camera to (lat, lon) on its ground plane."""
    east, north, _ = pymap3d.geodetic2enu(
        lat, lon, camera.ground_altitude_m, camera.lat, camera.lon, camera.ground_altitude_m
    )
    return float(east), float(north)


def project_offset(camera: Camera, east: float, north: float) -> tuple[float, float] | None:
    """Upright-image pixel (x, y) of the ground point (east, north) metres from beneath the
    camera, wherever it falls on the image plane; None when it is behind the camera."""
    seen = camera.rotation().T @ np.array([east, north, -camera.height_m])
    depth = float(seen[2])
    if not depth > 1e-9:
        return None
    u = camera.fx * float(seen[0]) / depth + camera.cx
    v = camera.fy * float(seen[1]) / depth + camera.cy
    return from_sensor(camera, u, v)


def project(
    camera: Camera, lat: float, lon: float, *, inside: bool = True
) -> tuple[float, float] | None:
    """Upright-image pixel (x, y) where the ground at (lat, lon) is seen; None when it is behind
    the camera or (`inside`) outside the image."""
    found = project_offset(camera, *ground_offset(camera, lat, lon))
    if found is None or not inside:
        return found
    width, height = camera.image_size
    x, y = found
    return found if 0 <= x <= width and 0 <= y <= height else None
