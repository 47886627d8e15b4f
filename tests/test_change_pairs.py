"""Describing what changed: ground points projected back into frames (round trips through
ground.py), and side-by-side pictures of each change queued as jobs through the real app."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from service import change_pairs
from service.geo.camera import Camera
from service.geo.ground import locate_pixel
from service.geo.project import from_sensor, project
from tests.conftest import RunningService
from tests.test_geo_service import AFTER, BEFORE, COLOURS, WHITE
from tests.test_geo_service import frame as painted
from tests.test_geo_service import geo_service as geo_service_fixture

geo_service = geo_service_fixture  # the fixture, shared

SW, SH, F = 4000, 3000, 2800.0


def camera(
    yaw: float, pitch: float, roll: float = 0.0, orientation: int = 1, height: float = 80.0
) -> Camera:
    return Camera(
        lat=46.5,
        lon=7.25,
        height_m=height,
        ground_altitude_m=500.0,
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        fx=F,
        fy=F,
        cx=SW / 2 + 13.0,  # an optical centre off the middle, as calibrated cameras have
        cy=SH / 2 - 7.0,
        sensor_width=SW,
        sensor_height=SH,
        orientation=orientation,
    )


POSES = {
    "nadir": camera(0, -90),
    "yawed": camera(137, -90),
    "oblique 30": camera(30, -60),
    "oblique 60": camera(-70, -30),
    "rolled": camera(200, -75, roll=12),
    "rotated 6": camera(45, -80, orientation=6),
    "rotated 3": camera(10, -90, orientation=3),
    "mirrored 7": camera(300, -50, roll=-5, orientation=7),
}


@pytest.mark.parametrize("name", POSES)
def test_a_ground_point_lands_on_the_pixel_it_was_seen_at(name: str) -> None:
    cam = POSES[name]
    width, height = cam.image_size
    tried = 0
    for fx in (0.0, 0.13, 0.5, 0.77, 1.0):
        for fy in (0.0, 0.31, 0.5, 0.9, 1.0):
            x, y = fx * width, fy * height
            seen = locate_pixel(cam, x, y)
            if isinstance(seen, str):  # above the horizon, or beyond the flat-ground range
                continue
            tried += 1
            back = project(cam, *seen, inside=False)
            assert back is not None
            assert back == pytest.approx((x, y), abs=0.01), (name, x, y)
            if 0 < fx < 1 and 0 < fy < 1:
                assert project(cam, *seen) == pytest.approx((x, y), abs=0.01)
    assert tried >= 10


def test_orientation_is_undone_exactly_as_the_camera_does() -> None:
    for orientation in range(1, 9):
        cam = camera(0, -90, orientation=orientation)
        for x, y in ((0.0, 0.0), (10.0, 2500.0), (2999.5, 17.25)):
            width, height = cam.image_size
            x, y = min(x, width), min(y, height)
            assert from_sensor(cam, *cam.to_sensor(x, y)) == pytest.approx((x, y))


def test_points_behind_the_camera_or_outside_the_image_have_no_pixel() -> None:
    import pymap3d

    cam = POSES["oblique 60"]  # looking west-north-west, 30 degrees below the horizon
    behind = pymap3d.enu2geodetic(200.0 * np.sin(np.radians(110)), 200.0 * np.cos(np.radians(110)),
                                  0.0, cam.lat, cam.lon, 500.0)  # fmt: skip
    assert project(cam, float(behind[0]), float(behind[1]), inside=False) is None
    nadir = POSES["nadir"]
    far = pymap3d.enu2geodetic(300.0, 0.0, 0.0, nadir.lat, nadir.lon, 500.0)
    assert project(nadir, float(far[0]), float(far[1])) is None
    assert project(nadir, float(far[0]), float(far[1]), inside=False) is not None


@pytest.mark.parametrize("name", ["yawed", "oblique 30", "rolled", "rotated 6", "mirrored 7"])
@pytest.mark.parametrize("span", [10.0, 60.0])
def test_a_half_shows_the_ground_north_up_at_its_scale(name: str, span: float) -> None:
    """Two marks painted where ground points a few metres apart are seen: in the half they
    sit where the ground says, whatever the camera's heading, tilt or EXIF orientation."""
    import pymap3d

    cam = POSES[name]
    width, height = cam.image_size
    centre = locate_pixel(cam, width * 0.45, height * 0.55)
    assert not isinstance(centre, str)
    east_of = pymap3d.enu2geodetic(span / 4, 0.0, 0.0, *centre, 500.0)
    north_of = pymap3d.enu2geodetic(0.0, span / 4, 0.0, *centre, 500.0)
    image = Image.new("RGB", (width, height), (90, 120, 90))
    painter = ImageDraw.Draw(image)
    radius = max(6.0, span / 40 / (80.0 / F))  # about span/40 metres across on the ground
    for (lat, lon), colour in ((centre, (230, 20, 20)), (east_of[:2], (20, 20, 230)),
                               (north_of[:2], (240, 240, 240))):  # fmt: skip
        x, y = project(cam, float(lat), float(lon)) or (-1e9, -1e9)
        painter.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    half = change_pairs.rectified(image, cam, (float(centre[0]), float(centre[1])), span)
    assert not isinstance(half, str)
    pixels = np.asarray(half, dtype=np.int16)
    size = change_pairs.HALF_PX
    quarter = size / 4
    for colour, (x, y) in (((230, 20, 20), (size / 2, size / 2)),
                           ((20, 20, 230), (size / 2 + quarter, size / 2)),
                           ((240, 240, 240), (size / 2, size / 2 - quarter))):  # fmt: skip
        found = np.argwhere((np.abs(pixels - np.array(colour)) < 60).all(axis=2))
        assert len(found), (name, colour)
        middle_y, middle_x = found.mean(axis=0)
        assert (middle_x, middle_y) == pytest.approx((x, y), abs=size * 0.02), (name, colour)


# -- through the service -----------------------------------------------------------------------


def frame(centre_east: float, objects: list[tuple[str, float, float]]) -> bytes:
    return painted(centre_east, objects, dots=True)


# BEFORE / AFTER: the first car stays, the second moves 8 m east, the tent goes, a car comes.


def survey(service: RunningService, plan: list[Any], flight: str, **fields: Any) -> list[int]:
    ids = []
    for n, (centre, objects) in enumerate(plan):
        sent = service.submit(frame(centre, objects), name=f"DJI_{n:04d}.JPG", flight=flight,
                              **fields)  # fmt: skip
        assert sent.status_code == 202, sent.text
        ids.append(sent.json()["id"])
    jobs = [service.wait(i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs), [j["error"] for j in jobs]
    return ids


def halves(service: RunningService, job_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The picture's two halves (below their title bands), as arrays of RGB."""
    answer = service.client.get(f"/v1/jobs/{job_id}/image")
    assert answer.status_code == 200, answer.text
    picture = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=np.int16)
    size, band, gap = change_pairs.HALF_PX, change_pairs.BAND_PX, change_pairs.GAP_PX
    assert picture.shape == (band + size, 2 * size + gap, 3)
    return picture[band:, :size], picture[band:, size + gap :]


def near_centre(half: np.ndarray, colour: tuple[int, int, int], reach: int = 24) -> int:
    """How many pixels within `reach` of the half's middle are close to `colour`."""
    middle = half.shape[0] // 2
    window = half[middle - reach : middle + reach, middle - reach : middle + reach]
    return int((np.abs(window - np.array(colour)) < 45).all(axis=2).sum())


def test_each_change_is_queued_as_a_side_by_side_picture_the_reasoner_describes(
    geo_service: Callable[..., RunningService], database_url: str | None
) -> None:
    service = geo_service(database_url=database_url)
    # The first survey blurs cars in every image it hands out: its originals are never shown.
    survey(service, BEFORE, "survey-1", redact="car")
    survey(service, AFTER, "survey-2")

    asked = {"before": "survey-1", "after": "survey-2"}
    answer = service.client.post("/v1/changes/describe", params=asked)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["before"], body["after"]) == ("survey-1", "survey-2")
    entries = {entry["kind"]: entry for entry in body["jobs"]}
    assert [e["kind"] for e in body["jobs"]] == ["new", "gone", "moved"]
    assert entries["new"]["before"] is None and entries["gone"]["after"] is None
    assert entries["moved"]["distance_m"] == pytest.approx(8.0, abs=0.3)
    assert all(isinstance(e["job_id"], int) and "reason" not in e for e in body["jobs"])

    jobs = {kind: service.wait(entry["job_id"]) for kind, entry in entries.items()}
    for kind, job in jobs.items():
        assert job["status"] == "succeeded", job["error"]
        assert job["source"] == "api" and job["flight"] is None
        assert job["params"]["queries"] == [entries[kind]["label"]]
        assert job["result"]["reasoning"] == "ok"
        assert (
            "Left: the place in flight survey-1; right: the same place in flight survey-2"
            in (job["params"]["prompt"])
        )
    assert "is moved by 8.0 m" in jobs["moved"]["params"]["prompt"]
    assert "a tent that is gone" in jobs["gone"]["params"]["prompt"]
    # The pictures are no frames of any flight: the flights are as they were.
    flights = {f["id"]: f for f in service.client.get("/v1/flights").json()["flights"]}
    assert set(flights) == {"survey-1", "survey-2"}

    red, blue = COLOURS["car"], COLOURS["tent"]
    # The moved car in the middle of both halves (each centred where that flight saw it); the
    # first survey's half from its redacted copy, where the car's white dot is blurred away.
    left, right = halves(service, entries["moved"]["job_id"])
    assert near_centre(left, red) > 200 and near_centre(right, red) > 200
    assert near_centre(left, WHITE, 12) == 0
    assert near_centre(right, WHITE, 12) > 10
    # The reasoner's own detector finds the car in both halves.
    assert len(jobs["moved"]["result"]["detections"]) == 2
    # Gone: the tent before, bare ground where it stood after.
    left, right = halves(service, entries["gone"]["job_id"])
    assert near_centre(left, blue) > 200 and near_centre(right, blue) == 0
    # New: bare ground before, the car after.
    left, right = halves(service, entries["new"]["job_id"])
    assert near_centre(left, red) == 0 and near_centre(right, red) > 200
    # Where the car will be, outlined (yellow, as JPEG keeps a thin line of it).
    yellow = (left[..., 0] > 180) & (left[..., 1] > 170) & (left[..., 2] < 140)
    assert yellow.sum() > 200

    only = service.client.post("/v1/changes/describe", params={**asked, "kinds": "moved"}).json()
    assert [e["kind"] for e in only["jobs"]] == ["moved"]


def test_a_big_comparison_needs_a_limit_and_unknown_flights_are_refused(
    geo_service: Callable[..., RunningService],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli.commands import run

    service = geo_service()
    survey(service, BEFORE, "survey-1")
    survey(service, AFTER, "survey-2")
    asked = {"before": "survey-1", "after": "survey-2"}
    monkeypatch.setattr(change_pairs, "MAX_UNASKED", 2)

    def describe(**params: Any) -> Any:
        return service.client.post("/v1/changes/describe", params={**asked, **params})

    refused = describe()
    assert refused.status_code == 422 and refused.json()["code"] == "too_many_changes"
    assert "limit" in refused.json()["message"]
    first = describe(limit="2")
    assert first.status_code == 202 and [e["kind"] for e in first.json()["jobs"]] == ["new", "gone"]
    for wrong, code in (
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": str(change_pairs.MAX_LIMIT + 1)}, "invalid_limit"),
        ({"kinds": "same"}, "invalid_kinds"),
    ):
        answer = describe(**wrong)
        assert answer.status_code == 422 and answer.json()["code"] == code, answer.text
    missing = service.client.post("/v1/changes/describe", params={**asked, "after": "nope"})
    assert missing.status_code == 404 and missing.json()["code"] == "flight_not_found"
    same = service.client.post("/v1/changes/describe", params={**asked, "after": "survey-1"})
    assert same.status_code == 422

    assert len(service.client.get("/v1/jobs").json()["jobs"]) == 4 + 2  # refused: none queued

    # A frame whose image is gone: its half says so; with neither image, nothing is queued.
    def remove(centre: float, objects: list[tuple[str, float, float]]) -> None:
        sha = hashlib.sha256(frame(centre, objects)).hexdigest()
        (service.services.files.root / "images" / sha[:2] / f"{sha}.jpg").unlink()

    remove(*AFTER[1])
    gone = describe(kinds="gone").json()["jobs"][0]
    assert service.wait(gone["job_id"])["status"] == "succeeded"
    left, right = halves(service, gone["job_id"])
    assert near_centre(left, COLOURS["tent"]) > 200
    assert near_centre(right, change_pairs.EMPTY, 200) > 150_000  # grey, with its reason
    remove(*BEFORE[1])
    nothing = describe(kinds="gone").json()["jobs"][0]
    assert nothing["job_id"] is None and "no longer in the data directory" in nothing["reason"]

    # The CLI: queue them and wait for each description.
    status = run(["changes", "survey-1", "survey-2", "--describe", "--kinds", "moved,gone",
                "--wait", "--url", service.url])  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert re.search(r"gone +tent \(job \d+ #1\): not described: no image of the place", out)
    assert re.search(r"moved car by 8\.\d m \(job \d+ #\d\): ok", out), out
