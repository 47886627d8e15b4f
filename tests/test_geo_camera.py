"""The camera model from EXIF and DJI XMP through the real intake path, and its refusals."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pytest

from service.decode import decode
from service.geo.camera import SIGMA_GNSS_RTK_M, Camera, Unlocated, camera_from_exif
from service.geo.georef import georeference
from service.intake import inspect_image
from tests.geo_frames import dji_jpeg, no_pose_jpeg

LIMIT = 50_000_000
POSE: dict[str, Any] = {"lat": 46.5, "lon": 7.25, "relative_altitude": 80.0}


def exif_of(data: bytes) -> tuple[dict[str, Any] | None, int, int]:
    record = inspect_image(data, max_pixels=LIMIT)
    return record.exif, record.width, record.height


def located(data: bytes, **options: Any) -> Camera:
    exif, width, height = exif_of(data)
    camera = camera_from_exif(exif, width, height, **options)
    assert isinstance(camera, Camera), camera
    return camera


def test_a_phantom_4_pro_35mm_equivalent_gives_its_1_inch_sensor() -> None:
    camera = located(dji_jpeg(5472, 3648, **POSE, focal_length=8.8, focal_length_35mm=24))
    assert camera.fx == pytest.approx(8.8 / 13.2 * 5472, rel=0.002)  # 2.41 µm pixels
    assert camera.sensor_width_mm == pytest.approx(13.2, rel=0.002)
    assert any("35 mm equivalent" in said for said in camera.assumptions)
    assert (camera.cx, camera.cy) == (2736, 1824)


@pytest.mark.parametrize(("width", "height"), [(5472, 3648), (4864, 3648), (5472, 3078)])
def test_without_a_35mm_equivalent_the_sensor_table_is_used(width: int, height: int) -> None:
    """3:2, 4:3 and 16:9 frames of the same 1-inch sensor share one pixel pitch."""
    data = dji_jpeg(width, height, **POSE, focal_length=8.8, focal_length_35mm=None)
    camera = located(data)
    assert camera.fx == pytest.approx(8.8 / 13.2 * 5472, rel=1e-6)
    assert any("Phantom 4 Pro spec sheet" in said for said in camera.assumptions)


def test_the_dji_calibration_wins_and_follows_a_resized_image() -> None:
    full = located(dji_jpeg(800, 600, **POSE, calibrated=(700.0, 410.0, 295.0)))
    assert (full.fx, full.cx, full.cy) == (700.0, 410.0, 295.0)
    assert "focal length and optical centre from the DJI calibration" in full.assumptions
    # A calibration for 1600 x 1200 on a copy resized to 800 x 600: the original size is read
    # as twice the optical centre (DJI's is within a few pixels of the middle).
    half = located(dji_jpeg(800, 600, **POSE, calibrated=(1400.0, 804.0, 598.0)))
    assert (half.fx, half.cx, half.cy) == pytest.approx((700.0, 400.0, 299.0), rel=0.006)
    assert any("scaled by 0.498" in said for said in half.assumptions)


def test_pose_and_height_come_from_the_xmp() -> None:
    data = dji_jpeg(**POSE, gimbal_pitch=-45.5, gimbal_yaw=-120.0, gimbal_roll=1.5, rtk_flag=50)
    camera = located(data)
    assert (camera.yaw, camera.pitch, camera.roll, camera.height_m) == (-120, -45.5, 1.5, 80)
    assert (camera.lat, camera.lon) == (46.5, 7.25)
    assert "flat ground at take-off height" in camera.assumptions
    assert camera.sigma_position_m == SIGMA_GNSS_RTK_M
    assert any("RTK" in said for said in camera.assumptions)
    assert any(said.startswith("1-sigma errors") for said in camera.assumptions)


def test_a_ground_elevation_uses_the_absolute_altitude() -> None:
    data = dji_jpeg(**POSE, absolute_altitude=433.8)
    assert located(data, ground_elevation=353.8).height_m == pytest.approx(80.0)
    from_gps = located(
        dji_jpeg(**POSE, absolute_altitude=None, gps_altitude=400.0), ground_elevation=350.0
    )
    assert from_gps.height_m == pytest.approx(50.0)
    assert any("GPS altitude" in said for said in from_gps.assumptions)
    exif, width, height = exif_of(dji_jpeg(**POSE, absolute_altitude=None))
    refused = camera_from_exif(exif, width, height, ground_elevation=350.0)
    assert isinstance(refused, Unlocated) and "absolute altitude" in refused.reason
    under = camera_from_exif(*exif_of(data), ground_elevation=500.0)
    assert isinstance(under, Unlocated) and "not above the ground" in under.reason


def test_the_element_form_of_the_xmp_is_read_too() -> None:
    data = dji_jpeg(**POSE, gimbal_pitch=-60.0, gimbal_yaw=33.0, element_form=True)
    camera = located(data)
    assert (camera.pitch, camera.yaw, camera.height_m) == (-60.0, 33.0, 80.0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (no_pose_jpeg(), "no GPS position in EXIF"),
        (dji_jpeg(**POSE, xmp=False), "no gimbal pitch"),
        (dji_jpeg(**POSE, gimbal_pitch=None), "no gimbal pitch"),
        (dji_jpeg(**POSE, gimbal_yaw=None, flight_yaw=None), "no camera heading"),
        (dji_jpeg(lat=46.5, lon=7.25, relative_altitude=None), "no relative altitude"),
        (dji_jpeg(**POSE, focal_length=None, focal_length_35mm=None), "no focal length"),
        (
            dji_jpeg(**POSE, model="XYZ-1", focal_length_35mm=None),
            "not in the sensor table",
        ),
        (dji_jpeg(lat=46.5, lon=7.25, relative_altitude=-3.0), "not above the ground"),
    ],
    ids=[
        "no-gps",
        "no-xmp",
        "no-pitch",
        "no-yaw",
        "no-height",
        "no-focal",
        "unknown-model",
        "below",
    ],
)
def test_a_frame_without_a_pose_gets_no_coordinates_and_says_why(data: bytes, reason: str) -> None:
    exif, width, height = exif_of(data)
    frame, detections = georeference(exif, width, height, [[10, 10, 50, 50], [0, 0, 5, 5]])
    assert reason in frame["reason"] and "lat" not in frame and "footprint" not in frame
    assert isinstance(frame["assumptions"], list)
    assert len(detections) == 2
    assert all(reason in d["reason"] and "lat" not in d for d in detections)
    json.dumps([frame, detections], allow_nan=False)


def test_a_flight_yaw_stands_in_for_a_missing_gimbal_yaw() -> None:
    camera = located(dji_jpeg(**POSE, gimbal_yaw=None, flight_yaw=77.0))
    assert camera.yaw == 77.0 and any("aircraft's heading" in s for s in camera.assumptions)


def _red_box(data: bytes) -> list[float]:
    pixels = np.asarray(decode(io.BytesIO(data), max_side=None).image).astype(int)
    ys, xs = np.nonzero((pixels[:, :, 0] > 170) & (pixels[:, :, 1] < 90))
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_undone_before_casting_rays(orientation: int) -> None:
    """The same sensor image, tagged with each EXIF orientation: the job sees it upright (its
    boxes in upright pixels), and the object lands on the same ground either way."""
    frame = {
        **POSE,
        "gimbal_pitch": -70.0,
        "gimbal_yaw": 25.0,
        "draw": [((40, 30, 120, 70), (250, 20, 20))],
    }
    plain = dji_jpeg(400, 300, **frame)
    tagged = dji_jpeg(400, 300, **frame, orientation=orientation)
    exif, width, height = exif_of(tagged)
    assert (width, height) == ((300, 400) if orientation >= 5 else (400, 300))
    _, (expected,) = georeference(*exif_of(plain), [_red_box(plain)])
    _, (found,) = georeference(exif, width, height, [_red_box(tagged)])
    assert found["lat"] == pytest.approx(expected["lat"], abs=2e-6)
    assert found["lon"] == pytest.approx(expected["lon"], abs=3e-6)
    assert found["area_m2"] == pytest.approx(expected["area_m2"], rel=0.05)
    assert found["width_m"] != pytest.approx(found["height_m"], rel=0.2)  # not a square
    if orientation in (5, 6, 7, 8):  # the upright box's width is the sensor box's height
        assert found["width_m"] == pytest.approx(expected["height_m"], rel=0.05)
    else:
        assert found["width_m"] == pytest.approx(expected["width_m"], rel=0.05)


ODD: list[Any] = [
    None,
    {},
    "exif",
    {"gps": "here"},
    {"gps": {"latitude": float("nan"), "longitude": 7.0}},
    {"gps": {"latitude": 46.0, "longitude": 7.0}, "dji": {"gimbal_pitch": float("inf")}},
    {
        "gps": {"latitude": 46.0, "longitude": 7.0},
        "focal_length_35mm": 0,
        "dji": {"gimbal_pitch": -90, "gimbal_yaw": 0, "relative_altitude": 50},
    },
    {
        "gps": {"latitude": 46.0, "longitude": 7.0},
        "focal_length_35mm": True,
        "orientation": 99,
        "dji": {"gimbal_pitch": "-90", "gimbal_yaw": None, "relative_altitude": 0},
    },
    {
        "gps": {"latitude": 46.0, "longitude": 7.0, "altitude": 1e300},
        "focal_length_35mm": 24,
        "dji": {"gimbal_pitch": -90, "gimbal_yaw": 0, "relative_altitude": 1e-9},
    },
]


@pytest.mark.parametrize("exif", ODD)
@pytest.mark.parametrize("size", [(800, 600), (0, 0), (float("nan"), 600)])
def test_odd_metadata_never_raises_and_stays_strict_json(exif: Any, size: tuple[Any, Any]) -> None:
    boxes: list[Any] = [[1, 2, 3, 4], [float("nan"), 0, 1, 1], "box", [1, 2, 3], [5, 5, 5, 5]]
    for elevation in (None, float("nan"), 12.0):
        frame, detections = georeference(exif, size[0], size[1], boxes, elevation)
        assert len(detections) == len(boxes)
        json.dumps([frame, detections], allow_nan=False)


def test_a_located_frame_reports_its_camera_and_assumptions() -> None:
    exif, width, height = exif_of(dji_jpeg(**POSE, gimbal_yaw=30.0, model="FC6310"))
    frame, (geo,) = georeference(exif, width, height, [[350, 250, 450, 350]])
    assert frame["camera"]["model"] == "FC6310" and frame["camera"]["height_m"] == 80.0
    assert frame["camera"]["focal_px"] == pytest.approx(24 * 1000 / math.hypot(36, 24), abs=0.01)
    assert "pinhole camera with square pixels and no lens distortion" in frame["assumptions"]
    assert set(geo) == {
        "lat",
        "lon",
        "footprint",
        "width_m",
        "height_m",
        "area_m2",
        "distance_m",
        "uncertainty_m",
    }
    assert set(frame) == {"camera", "assumptions", "centre", "footprint", "gsd_cm", "uncertainty_m"}
