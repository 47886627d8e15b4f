"""Rays onto flat ground against an independent model (cameratransform), sizes, the horizon."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import warnings
from typing import Any

import numpy as np
import pymap3d
import pytest

from service.decode import decode
from service.geo.camera import SIGMA_ATTITUDE_DEG, SIGMA_GNSS_M, Camera
from service.geo.georef import georeference
from service.geo.ground import (
    MAX_RANGE_M,
    box_geo,
    footprint,
    frame_geo,
    hit,
    locate,
    locate_pixel,
)
from service.intake import inspect_image
from tests.geo_frames import dji_jpeg

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import cameratransform as ct

W, H, F = 4000, 3000, 2800.0
LAT, LON, GROUND = 46.5, 7.25, 500.0
PIXELS = [
    (W / 2, H / 2),
    (0, 0),
    (W, 0),
    (W, H),
    (0, H),
    (1000, 2500),
    (3500, 700),
    (123, 1789),
    (2600, 40),
]


def camera(yaw: float, pitch: float, roll: float = 0.0, height: float = 80.0) -> Camera:
    return Camera(
        lat=LAT,
        lon=LON,
        height_m=height,
        ground_altitude_m=GROUND,
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        fx=F,
        fy=F,
        cx=W / 2,
        cy=H / 2,
        sensor_width=W,
        sensor_height=H,
    )


def reference(yaw: float, pitch: float, roll: float = 0.0, height: float = 80.0) -> Any:
    """cameratransform's camera for the same DJI pose. Its conventions (checked in its docs and
    by test_the_reference_conventions_are_understood): space x east, y north; heading clockwise
    from north; tilt 0 looking down, 90 at the horizon; its roll turns the image the opposite
    way to DJI's (positive DJI roll = right side down)."""
    return ct.Camera(
        ct.RectilinearProjection(focallength_px=F, image=(W, H)),
        ct.SpatialOrientation(
            elevation_m=height, tilt_deg=90 + pitch, roll_deg=-roll, heading_deg=yaw
        ),
    )


def enu(lat: float, lon: float) -> tuple[float, float]:
    east, north, _ = pymap3d.geodetic2enu(lat, lon, GROUND, LAT, LON, GROUND)
    return float(east), float(north)


def test_the_reference_conventions_are_understood() -> None:
    looking_north_down = reference(0, -60)
    top_middle = looking_north_down.spaceFromImage(np.array([[W / 2, 0.0]]), Z=0)[0]
    assert top_middle[1] > 100 and abs(top_middle[0]) < 1e-6  # far, and due north
    looking_east = reference(90, -60).spaceFromImage(np.array([[W / 2, H / 2]]), Z=0)[0]
    assert looking_east[0] > 0 and abs(looking_east[1]) < 1e-6


def test_positive_roll_puts_the_right_side_down() -> None:
    """DJI: roll positive = right side down, so the right edge sees ground nearer the drone."""
    rolled = camera(0, -30, roll=10)
    right, left = hit(rolled, W, H / 2), hit(rolled, 0, H / 2)
    assert not isinstance(right, str) and not isinstance(left, str)
    assert math.hypot(*right) < math.hypot(*left)


POSES = {
    "nadir": (0.0, -90.0, 0.0),
    "nadir, yawed 37°": (37.0, -90.0, 0.0),
    "30° oblique (pitch -60)": (0.0, -60.0, 0.0),
    "60° oblique (pitch -30), yawed 120°": (120.0, -30.0, 0.0),
    "30° from the horizon (pitch -30), yawed 200°": (200.0, -30.0, 0.0),
    "60° from the horizon (pitch -60), yawed 250°, rolled 5°": (250.0, -60.0, 5.0),
    "nadir, rolled 8°": (0.0, -90.0, 8.0),
    "pitch -45, yawed 300°, rolled -6°": (300.0, -45.0, -6.0),
    "pitch -70, yawed 15°, rolled 12°": (15.0, -70.0, 12.0),
}


@pytest.mark.parametrize("name", list(POSES))
def test_ground_points_agree_with_cameratransform(name: str) -> None:
    yaw, pitch, roll = POSES[name]
    ours, theirs = camera(yaw, pitch, roll), reference(yaw, pitch, roll)
    compared = 0
    for x, y in PIXELS:
        expected = theirs.spaceFromImage(np.array([[x, y]], dtype=float), Z=0)[0]
        if not np.all(np.isfinite(expected)):
            assert isinstance(hit(ours, x, y, limit=False), str)
            continue
        found = locate_pixel(ours, x, y)
        if isinstance(found, str):  # beyond MAX_RANGE_M: the local geometry still agrees
            assert "beyond" in found
            point = hit(ours, x, y, limit=False)
            assert not isinstance(point, str)
        else:
            point = enu(*found)
        drone_distance = math.hypot(float(expected[0]), float(expected[1]), ours.height_m)
        miss = math.hypot(point[0] - expected[0], point[1] - expected[1])
        assert miss <= 0.01 * drone_distance, (x, y, point, expected)
        compared += 1
    assert compared >= 7


@pytest.mark.parametrize("name", ["nadir", "nadir, yawed 37°", "30° oblique (pitch -60)"])
def test_frame_footprint_is_the_reference_image_corners(name: str) -> None:
    yaw, pitch, roll = POSES[name]
    geo = frame_geo(camera(yaw, pitch, roll))
    ring = geo["footprint"]
    assert ring is not None and ring[0] == ring[-1] and len(ring) == 5
    corners = reference(yaw, pitch, roll).spaceFromImage(
        np.array([[0, 0], [W, 0], [W, H], [0, H]], dtype=float), Z=0
    )
    found = [enu(lat, lon) for lon, lat in ring[:-1]]
    for corner in corners:
        nearest = min(math.hypot(p[0] - corner[0], p[1] - corner[1]) for p in found)
        assert nearest <= 0.01 * math.hypot(corner[0], corner[1], 80.0)
    area = 0.5 * sum(
        a[0] * b[1] - b[0] * a[1] for a, b in zip(found, [*found[1:], found[0]], strict=True)
    )
    assert area > 0  # counter-clockwise: GeoJSON's right-hand rule


def test_a_nadir_frame_centre_lands_on_the_drone() -> None:
    for yaw in (0.0, 63.0, -170.0):
        geo = frame_geo(camera(yaw, -90.0, height=120.0))
        east, north = enu(geo["centre"]["lat"], geo["centre"]["lon"])
        assert math.hypot(east, north) < 0.01
        assert geo["gsd_cm"] == pytest.approx(100 * 120.0 / F, rel=1e-4)


def test_uncertainty_at_nadir_is_the_root_sum_square_of_the_sources() -> None:
    geo = frame_geo(camera(0.0, -90.0, height=80.0))
    tilt = 80.0 * math.tan(math.radians(SIGMA_ATTITUDE_DEG))  # about each horizontal axis
    assert geo["uncertainty_m"] == pytest.approx(math.sqrt(SIGMA_GNSS_M**2 + 2 * tilt**2), abs=0.01)


def test_uncertainty_grows_with_distance_in_an_oblique_frame() -> None:
    oblique = camera(0.0, -30.0)
    near, far = (
        box_geo(oblique, [1900, 2900, 2100, 3000]),
        box_geo(oblique, [1900, 1000, 2100, 1100]),
    )
    assert far["distance_m"] > near["distance_m"]
    assert far["uncertainty_m"] > near["uncertainty_m"] > SIGMA_GNSS_M


def test_pixels_above_the_horizon_get_a_reason_not_coordinates() -> None:
    level = camera(0.0, -5.0)
    assert "horizon" in str(locate_pixel(level, W / 2, 10))
    assert box_geo(level, [100, 10, 300, 200]) == {
        "reason": "the box centre is at or above the horizon"
    }
    straddling = box_geo(level, [1900, 500, 2100, 2800])  # the centre below, the top above
    assert straddling["lat"] and straddling["footprint"] is None and straddling["width_m"] is None
    far = box_geo(level, [1900, 1280, 2100, 1300])  # below the horizon but kilometres away
    assert "beyond" in far["reason"] and "km" in far["reason"]
    geo = frame_geo(level)
    assert geo["centre"] is not None and geo["uncertainty_m"] > 10
    ring = geo["footprint"]
    reach = [math.hypot(*enu(lat, lon)) for lon, lat in ring]
    assert max(reach) == pytest.approx(MAX_RANGE_M, rel=0.01)  # cut at the range limit
    near = reference(0.0, -5.0).spaceFromImage(np.array([[0, H], [W, H]], dtype=float), Z=0)
    for corner in near:  # the near edge is the image's bottom corners
        assert min(math.hypot(*np.subtract(enu(lat, lon), corner[:2])) for lon, lat in ring) < 0.5
    looking_up = frame_geo(camera(0.0, 30.0))
    assert looking_up["centre"] is None and looking_up["footprint"] is None
    assert looking_up["gsd_cm"] is None and looking_up["uncertainty_m"] is None


def test_footprint_of_a_level_camera_lies_within_range() -> None:
    ground = footprint(camera(45.0, 0.0))
    assert ground is not None
    assert all(math.hypot(*p) <= MAX_RANGE_M + 1e-6 for p in ground)


GSD = 50.0 / (24 * math.hypot(W, H) / math.hypot(36, 24))  # metres per pixel at 50 m


def _planted(yaw: float, east: float, north: float) -> tuple[bytes, list[float]]:
    """A nadir frame from 50 m with a 4.0 x 2.0 m object (long side along the image x axis)
    centred `east`, `north` metres from beneath the drone; the exact box it should fill."""
    # At nadir the image top faces the yaw, the image's right side yaw + 90°.
    up = (math.sin(math.radians(yaw)), math.cos(math.radians(yaw)))
    right = (math.sin(math.radians(yaw + 90)), math.cos(math.radians(yaw + 90)))
    x = W / 2 + (east * right[0] + north * right[1]) / GSD
    y = H / 2 - (east * up[0] + north * up[1]) / GSD
    box = [x - 2.0 / GSD, y - 1.0 / GSD, x + 2.0 / GSD, y + 1.0 / GSD]
    data = dji_jpeg(
        W,
        H,
        lat=LAT,
        lon=LON,
        relative_altitude=50.0,
        gimbal_yaw=yaw,
        color=(90, 120, 90),
        draw=[([round(v) for v in box], (250, 20, 20))],
    )
    return data, box


def _found_box(data: bytes) -> list[float]:
    """The planted red object, found in the upright decoded image (the job's pixels)."""
    pixels = np.asarray(decode(io.BytesIO(data), max_side=None).image).astype(int)
    red = (pixels[:, :, 0] > 170) & (pixels[:, :, 1] < 90)
    ys, xs = np.nonzero(red)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize(("yaw", "east", "north"), [(0.0, 20.0, -10.0), (90.0, -5.0, 12.0)])
def test_a_planted_object_gets_its_real_size_and_place(
    yaw: float, east: float, north: float
) -> None:
    data, _ = _planted(yaw, east, north)
    record = inspect_image(data, max_pixels=50_000_000)
    box = _found_box(data)
    frame, (geo,) = georeference(record.exif, record.width, record.height, [box])
    json.dumps([frame, geo], allow_nan=False)
    assert (
        frame["camera"]["height_m"] == 50.0
        and "flat ground at take-off height" in frame["assumptions"]
    )
    assert geo["width_m"] == pytest.approx(4.0, rel=0.02)
    assert geo["height_m"] == pytest.approx(2.0, rel=0.02)
    assert geo["area_m2"] == pytest.approx(8.0, rel=0.03)
    found_east, found_north = enu(geo["lat"], geo["lon"])
    assert math.hypot(found_east - east, found_north - north) < 2 * GSD
    assert geo["distance_m"] == pytest.approx(math.hypot(east, north, 50.0), abs=2 * GSD)
    ring = [enu(lat, lon) for lon, lat in geo["footprint"][:-1]]
    long_side = max(
        (np.subtract(b, a) for a, b in zip(ring, [*ring[1:], ring[0]], strict=True)),
        key=lambda v: math.hypot(*v),
    )
    heading = math.degrees(math.atan2(long_side[0], long_side[1])) % 180
    assert heading == pytest.approx((yaw + 90) % 180, abs=1.0)  # the long side lies along x


def _turned(rotation: np.ndarray, axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    turn = np.eye(3)
    turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
    return rotation @ turn


def _one_by_one_sigma(cam: Camera, x: float, y: float) -> float | None:
    """The uncertainty from single rays through `hit` (the frame is placed in arrays)."""
    base = hit(cam, x, y, limit=False)
    if isinstance(base, str):
        return None
    total = cam.sigma_position_m**2 + (math.hypot(*base) * cam.sigma_height_m / cam.height_m) ** 2
    for axis in range(3):
        both = [
            hit(cam, x, y, limit=False, rotation=_turned(cam.rotation(), axis, t))
            for t in (cam.sigma_attitude_deg, -cam.sigma_attitude_deg)
        ]
        points = [p for p in both if not isinstance(p, str)]
        if len(points) == 2:
            total += max(math.dist(base, p) for p in points) ** 2
            continue
        rotation = _turned(cam.rotation(), axis, cam.sigma_attitude_deg * 1e-3)
        small = hit(cam, x, y, limit=False, rotation=rotation)
        if isinstance(small, str):
            return None
        total += (math.dist(base, small) * 1e3) ** 2
    return math.sqrt(total)


EQUIVALENCE_BOXES: list[Any] = [
    *([x, y, x + 180, y + 120] for x in range(-100, 4000, 610) for y in range(-50, 3000, 530)),
    [0, 0, W, H],
    [2000, 1500, 2000, 1500],
    [300, 900, 100, 700],
    [1, 2, 3],
    [0, float("inf"), 1, 1],
]


@pytest.mark.parametrize(
    ("yaw", "pitch", "roll", "orientation"),
    [
        (0, -90, 0, 1),
        (30, -90, 0, 3),
        (123, -60, 0, 6),
        (200, -30, 5, 8),
        (10, -8, 0, 1),
        (300, -2, -12, 5),
        (45, 10, 0, 1),
    ],
)
def test_a_frame_placed_at_once_matches_its_points_placed_one_by_one(
    yaw: float, pitch: float, roll: float, orientation: int
) -> None:
    """Every box of a frame is cast and converted in arrays; the one-ray-at-a-time path
    (`hit`, `locate_pixel`) gives the same rounded numbers, but for the last rounded digit,
    which a last-bit difference between array and scalar float maths may flip."""
    cam = dataclasses.replace(camera(yaw, pitch, roll), orientation=orientation)
    frame, found = locate(cam, EQUIVALENCE_BOXES)
    assert frame == frame_geo(cam)
    assert found == [box_geo(cam, box) for box in EQUIVALENCE_BOXES]
    degree, metre = 1.01e-7, 0.0101
    kinds = set()
    for box, geo in zip(EQUIVALENCE_BOXES, found, strict=True):
        if len(box) != 4 or not all(map(math.isfinite, box)):
            assert geo == {"reason": "the box is not four finite numbers"}
            continue
        x1, x2 = sorted(box[0::2])
        y1, y2 = sorted(box[1::2])
        centre = hit(cam, (x1 + x2) / 2, (y1 + y2) / 2)
        if isinstance(centre, str):
            assert geo == {"reason": f"the box centre {centre}"}
            kinds.add("unlocated")
            continue
        place = locate_pixel(cam, (x1 + x2) / 2, (y1 + y2) / 2)
        assert not isinstance(place, str)
        lat, lon = place
        assert geo["lat"] == pytest.approx(lat, abs=degree)
        assert geo["lon"] == pytest.approx(lon, abs=degree)
        assert geo["distance_m"] == pytest.approx(math.hypot(*centre, cam.height_m), abs=metre)
        sigma = _one_by_one_sigma(cam, (x1 + x2) / 2, (y1 + y2) / 2)
        assert sigma is not None and geo["uncertainty_m"] == pytest.approx(sigma, abs=metre)
        pixels = ((x1, y1), (x2, y1), (x2, y2), (x1, y2))
        corners = [
            c for c in (locate_pixel(cam, x, y) for x, y in pixels) if not isinstance(c, str)
        ]
        if len(corners) < 4:
            assert geo["footprint"] is geo["width_m"] is geo["area_m2"] is None
            kinds.add("no footprint")
            continue
        kinds.add("footprint")
        ring = geo["footprint"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        for corner in corners:
            assert any(
                abs(lon - corner[1]) <= degree and abs(lat - corner[0]) <= degree
                for lon, lat in ring
            )
        ground = [g for g in (hit(cam, x, y) for x, y in pixels) if not isinstance(g, str)]
        top_left, top_right, bottom_right, bottom_left = ground
        width = (math.dist(top_left, top_right) + math.dist(bottom_left, bottom_right)) / 2
        assert geo["width_m"] == pytest.approx(width, abs=metre)
    assert "footprint" in kinds
