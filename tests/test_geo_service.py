"""Where detections are on the ground, through the real app, worker and store (both backends):
geotagged frames in, positions and real sizes on the jobs, flights, filters with geometry,
exports that load in their reference readers, the flight report, and what changed."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import geojson
import numpy as np
import pymap3d
import pytest
from fastkml import kml
from PIL import Image
from scipy import ndimage

from service.detection import Detection
from tests.conftest import RunningService, make_settings, stand_in_host, until
from tests.geo_frames import dji_jpeg, no_pose_jpeg

LAT0, LON0 = 51.4800, -0.1100
HEIGHT = 50.0  # metres above the take-off point
FOCAL = 800.0  # pixels, calibrated: one pixel is HEIGHT / FOCAL = 6.25 cm on the ground
GSD = HEIGHT / FOCAL
W, H = 800, 600
COLOURS = {"car": (230, 20, 20), "tent": (20, 20, 230)}
SIZES = {"car": (4.0, 2.0), "tent": (3.0, 3.0)}  # east-west by north-south, metres


class PaintedDetector:
    """Finds the painted rectangles of each query's colour: boxes where the objects are, so
    the geometry has something real to place (random-weight models find nothing in
    particular)."""

    def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
        colour = COLOURS.get(query)
        if colour is None:
            return []
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        mask = (np.abs(pixels - np.array(colour)) < 70).all(axis=2)
        labelled, _count = ndimage.label(mask)
        found = []
        for rows, cols in ndimage.find_objects(labelled):
            if (rows.stop - rows.start) * (cols.stop - cols.start) < 20:
                continue
            box = (float(cols.start), float(rows.start), float(cols.stop), float(rows.stop))
            found.append(Detection(query, box, image.size))
        return found


def place(east: float, north: float) -> tuple[float, float]:
    lat, lon, _ = pymap3d.enu2geodetic(east, north, 0.0, LAT0, LON0, 0.0)
    return float(lat), float(lon)


WHITE = (255, 255, 255)


def frame(
    centre_east: float,
    objects: list[tuple[str, float, float]],
    *,
    dots: bool = False,
    **changes: Any,
) -> bytes:
    """A nadir frame (north up) over (centre_east, 0) with each (label, east, north) painted
    at its real size; with `dots`, a small white dot at each car's middle (what redaction
    blurs away)."""
    lat, lon = place(centre_east, 0.0)
    draw = []
    for label, east, north in objects:
        width, height = SIZES[label]
        x = W / 2 + (east - centre_east) / GSD
        y = H / 2 - north / GSD
        box = (
            round(x - width / GSD / 2),
            round(y - height / GSD / 2),
            round(x + width / GSD / 2),
            round(y + height / GSD / 2),
        )
        draw.append((box, COLOURS[label]))
        if dots and label == "car":
            draw.append(((round(x) - 3, round(y) - 3, round(x) + 3, round(y) + 3), WHITE))
    fields: dict[str, Any] = {
        "lat": lat,
        "lon": lon,
        "relative_altitude": HEIGHT,
        "absolute_altitude": 80.0,
        "calibrated": (FOCAL, W / 2, H / 2),
        "rtk_flag": 50,
        "draw": draw,
        **changes,
    }
    return dji_jpeg(W, H, **fields)


# Two surveys over the same two frames of ground: the first car stays, the second moves 8 m
# east, the tent is gone and a car is new.
BEFORE = [
    (0.0, [("car", -10.0, 5.0), ("car", 10.0, -8.0)]),
    (40.0, [("tent", 35.0, 0.0)]),
]
AFTER = [
    (0.0, [("car", -10.0, 5.0), ("car", 18.0, -8.0)]),
    (40.0, [("car", 50.0, 10.0)]),
]


@pytest.fixture
def geo_service(tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    started: list[RunningService] = []

    def _serve(**changes: Any) -> RunningService:
        host = stand_in_host(PaintedDetector())
        settings = make_settings(tmp_path, default_queries=("car", "tent"), **changes)
        service = RunningService(settings, host).start()
        started.append(service)
        return service

    yield _serve
    for service in started:
        service.stop()


def submit_all(service: RunningService, frames: list[tuple[bytes, dict[str, Any]]]) -> list[dict]:
    ids = []
    for n, (data, fields) in enumerate(frames):
        response = service.submit(data, name=f"DJI_{n:04d}.JPG", **fields)
        assert response.status_code in (200, 201, 202), response.text
        ids.append(response.json()["id"])
    return [service.wait(i) for i in ids]


def survey(service: RunningService, plan: list[Any], flight: str) -> list[dict]:
    jobs = submit_all(service, [(frame(c, objs), {"flight": flight}) for c, objs in plan])
    assert all(j["status"] == "succeeded" for j in jobs), [j["error"] for j in jobs]
    return jobs


def ground_offset(lat: float, lon: float) -> tuple[float, float]:
    east, north, _ = pymap3d.geodetic2enu(lat, lon, 0.0, LAT0, LON0, 0.0)
    return float(east), float(north)


def test_detections_get_places_and_real_sizes_and_flights_compare(
    geo_service: Callable[..., RunningService], database_url: str | None
) -> None:
    service = geo_service(database_url=database_url)
    before = survey(service, BEFORE, "survey-1")
    after = survey(service, AFTER, "survey-2")

    # Each planted object is where it was painted, at its real size.
    first = before[0]
    ground = first["result"]["geo"]
    assert ground["gsd_cm"] == pytest.approx(GSD * 100, rel=0.01)
    assert ground_offset(ground["centre"]["lat"], ground["centre"]["lon"]) == pytest.approx(
        (0.0, 0.0), abs=0.05
    )
    assert any("take-off" in a for a in ground["assumptions"])
    cars = sorted(first["result"]["detections"], key=lambda d: d["geo"]["lon"])
    for detection, (label, east, north) in zip(cars, BEFORE[0][1], strict=True):
        geo = detection["geo"]
        assert detection["label"] == label
        assert ground_offset(geo["lat"], geo["lon"]) == pytest.approx((east, north), abs=0.2)
        assert (geo["width_m"], geo["height_m"]) == pytest.approx(SIZES[label], rel=0.06)
        assert geo["area_m2"] == pytest.approx(8.0, rel=0.1)
        assert geo["uncertainty_m"] > 0
    assert first["flight"] == "survey-1"

    # Flights: counts, sizes and the ground they cover.
    listed = {f["id"]: f for f in service.client.get("/v1/flights").json()["flights"]}
    assert set(listed) == {"survey-1", "survey-2"}
    one = listed["survey-1"]
    assert one["frames"] == 2 and one["located"] == 2 and one["explicit"]
    assert one["counts"] == {"car": 2, "tent": 1}
    assert one["sizes"]["tent"]["max"] == pytest.approx(3.0, rel=0.06)
    # Two 50 x 37.5 m frames 40 m apart: 90 x 37.5 m.
    assert one["area_m2"] == pytest.approx(90 * 37.5, rel=0.02)
    assert service.client.get("/v1/flights/survey-2").json()["job_ids"] == [j["id"] for j in after]
    missing = service.client.get("/v1/flights/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "flight_not_found"

    # What changed: exactly the planted changes.
    changes = service.client.get(
        "/v1/changes", params={"before": "survey-1", "after": "survey-2"}
    ).json()
    assert {k: v for k, v in changes["counts"].items() if v} == {
        "same": 1,
        "moved": 1,
        "gone": 1,
        "new": 1,
    }
    assert changes["moved"][0]["distance_m"] == pytest.approx(8.0, abs=0.3)
    assert changes["gone"][0]["label"] == "tent"
    new = changes["new"][0]["after"]
    assert ground_offset(new["lat"], new["lon"]) == pytest.approx((50.0, 10.0), abs=0.2)
    as_geojson = service.client.get(
        "/v1/changes", params={"before": "survey-1", "after": "survey-2", "format": "geojson"}
    )
    assert as_geojson.headers["content-type"].startswith("application/geo+json")
    assert geojson.loads(as_geojson.text).is_valid

    # Filters with geometry: a box around the second frame only, a minimum size, a flight.
    def ids(**params: Any) -> set[int]:
        response = service.client.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return {j["id"] for j in response.json()["jobs"]}

    south, west = place(60.0, -5.0)
    north, east = place(70.0, 5.0)
    everything = {j["id"] for j in before + after}
    assert ids(bbox=f"{east},{south},{west},{north}") == everything  # across the antimeridian
    assert ids(bbox=f"{west},{south},{east},{north}") == {before[1]["id"], after[1]["id"]}
    assert ids(min_size_m="2.9", label="tent") == {before[1]["id"]}
    assert ids(min_size_m="3.5") == {before[0]["id"], after[0]["id"], after[1]["id"]}
    assert ids(min_size_m="3.5", min_count="2") == {before[0]["id"], after[0]["id"]}
    assert ids(flight="survey-2") == {j["id"] for j in after}
    for wrong in ("1,2,3", "a,b,c,d", "10,80,20,70", "nan,1,2,3"):
        refused = service.client.get("/v1/jobs", params={"bbox": wrong})
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_filter"

    # Exports with geometry load in their reference readers.
    exported = service.client.get("/v1/exports/jobs.geojson", params={"flight": "survey-1"})
    collection = geojson.loads(exported.text)
    assert collection.is_valid, collection.errors()
    kinds = [f["properties"].get("kind") for f in collection["features"]]
    assert kinds.count("detection") == 3 and kinds.count("frame") == 2
    placemarks = service.client.get("/v1/exports/jobs.kml", params={"flight": "survey-2"})
    assert placemarks.headers["content-type"].startswith("application/vnd.google-earth.kml+xml")
    document = kml.KML.from_string(placemarks.content)
    assert len(re.findall(r"<Placemark", placemarks.text)) >= 3 + 2
    assert document.features
    rows = list(csv.DictReader(io.StringIO(service.client.get("/v1/exports/jobs.csv").text)))
    tents = [r for r in rows if r["label"] == "tent"]
    assert len(tents) == 1 and float(tents[0]["width_m"]) == pytest.approx(3.0, rel=0.06)
    assert ground_offset(
        float(tents[0]["detection_lat"]), float(tents[0]["detection_lon"])
    ) == pytest.approx((35.0, 0.0), abs=0.2)

    # The report: one self-contained document, with what changed since the first survey.
    report = service.client.get("/v1/reports/survey-2", params={"since": "survey-1"})
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "data:image/jpeg;base64," in report.text
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", report.text)
    assert 'id="changes"' in report.text


def test_frames_without_a_pose_or_a_name_still_say_where_they_stand(
    geo_service: Callable[..., RunningService],
) -> None:
    service = geo_service()
    jobs = submit_all(
        service,
        [
            (no_pose_jpeg(), {}),
            (frame(0.0, [("car", 0.0, 0.0)], captured_at="2026:11:23 08:00:05"), {}),
            (frame(0.0, [("car", 0.0, 0.0)], captured_at="2026:11:23 08:02:00"), {}),
            (frame(0.0, [("car", 0.0, 0.0)], captured_at="2026:11:23 09:00:00"), {}),
            # The ground 20 m above the take-off point: the drone is 30 m over it, not 50.
            (frame(0.0, [("car", 0.0, 0.0)]), {"ground_elevation": "50", "flight": "hill"}),
        ],
    )
    unposed = jobs[0]["result"]
    assert unposed["geo"]["reason"] and "lat" not in (unposed["geo"].get("centre") or {})
    hill = jobs[4]["result"]["detections"][0]["geo"]
    assert hill["width_m"] == pytest.approx(4.0 * 30 / 50, rel=0.06)
    assert any(
        "sea level" in a or "elevation" in a for a in jobs[4]["result"]["geo"]["assumptions"]
    )

    flights = service.client.get("/v1/flights").json()["flights"]
    auto = sorted(f["id"] for f in flights if not f["explicit"])
    assert auto == ["auto-20261123-080005", "auto-20261123-090000"]
    early = next(f for f in flights if f["id"] == "auto-20261123-080005")
    # The unposed frame has a capture time: it flew, though nobody knows where.
    assert early["job_ids"] == [jobs[0]["id"], jobs[1]["id"], jobs[2]["id"]]
    assert early["frames"] == 3 and early["located"] == 2
    listed = service.client.get("/v1/jobs", params={"flight": "auto-20261123-080005"}).json()
    assert {j["id"] for j in listed["jobs"]} == {j["id"] for j in jobs[:3]}

    for name in (
        "\x07bell",
        ".",
        "a/../b",
        "a//b",
        "x/",
        "auto-20261123-080005",
        "auto-20261123-080005-2",
    ):
        refused = service.submit(frame(0.0, []), flight=name)
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_flight", name
    refused = service.submit(frame(0.0, []), ground_elevation="high")
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_option"
    for path in (
        "/v1/reports/hill?format=doc",
        "/v1/reports/hill?sinc=x",
        "/v1/flights?limit=5",
        "/v1/changes?before=hill&after=hill",
    ):
        answer = service.client.get(path)
        assert answer.status_code == 422, answer.text

    # A frame whose footprint crosses the antimeridian is found where its camera is, not
    # everywhere.
    edge = dji_jpeg(
        W, H, lat=10.0, lon=179.9999, relative_altitude=50, calibrated=(FOCAL, 400, 300)
    )
    east_edge = submit_all(service, [(edge, {})])[0]
    ring = east_edge["result"]["geo"]["footprint"]
    assert max(p[0] for p in ring) > 179 and min(p[0] for p in ring) < -179  # both sides
    near_london = service.client.get("/v1/jobs", params={"bbox": "-1,51,1,52"}).json()["jobs"]
    assert east_edge["id"] not in {j["id"] for j in near_london}
    at_edge = service.client.get("/v1/jobs", params={"bbox": "179.99,9.99,-179.99,10.01"}).json()
    assert [j["id"] for j in at_edge["jobs"]] == [east_edge["id"]]


def test_an_inbox_subfolder_is_a_flight(
    geo_service: Callable[..., RunningService], tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    service = geo_service(inbox=inbox, inbox_settle_seconds=0.3, inbox_rescan_seconds=3600.0)
    (inbox / "site-a" / "day 1").mkdir(parents=True)
    (inbox / "site-a" / "day 1" / "DJI_0001.JPG").write_bytes(frame(0.0, [("car", 0.0, 0.0)]))
    (inbox / "loose.jpg").write_bytes(frame(0.0, [], captured_at="2026:11:24 10:00:00"))

    def filed() -> list[dict[str, Any]] | None:
        jobs = service.client.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"]
        return jobs if len(jobs) == 2 else None

    jobs = {j["input"]["name"]: j for j in until(filed, what="both files processed")}
    assert jobs["DJI_0001.JPG"]["flight"] == "site-a/day 1"
    assert jobs["loose.jpg"]["flight"] is None
    flights = {f["id"] for f in service.client.get("/v1/flights").json()["flights"]}
    assert flights == {"site-a/day 1", "auto-20261124-100000"}
    one = service.client.get("/v1/flights/site-a/day 1").json()
    assert one["counts"] == {"car": 1}


def test_the_cli_lists_flights_and_writes_a_report(
    geo_service: Callable[..., RunningService],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.cli.commands import run

    service = geo_service()
    jobs = survey(service, BEFORE, "north field/1")
    assert run(["show", str(jobs[0]["id"]), "--url", service.url]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"flight +north field/1", shown)
    assert re.search(r"ground +centre 51\.48\d+, -0\.11\d+, 6\.2 cm/px, ±", shown)
    assert re.search(r"car +\[.*\]  at 51\.48\d+, -0\.11\d+, 4\.\d x 2\.\d m", shown)
    assert run(["flights", "--url", service.url]) == 0
    out = capsys.readouterr().out
    assert "north field/1" in out and "2 car" in out
    # West of Greenwich: a bbox starting with a minus is the flag's value, not another flag.
    assert run(["jobs", "--bbox", "-0.2,51.4,0.0,51.6", "--url", service.url]) == 0
    assert len(re.findall(r"DJI_000\d\.JPG", capsys.readouterr().out)) == 2
    monkeypatch.chdir(tmp_path)
    assert run(["report", "north field/1", "--url", service.url]) == 0
    target = tmp_path / "flight-north-field-1.html"  # the name the service gave it
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    report = service.client.get("/v1/reports/north field/1")
    assert report.headers["content-security-policy"].startswith("default-src 'none'")
    assert run(["report", "nope", "--url", service.url, "-o", str(tmp_path / "x.html")]) == 1
    assert "no flight named" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_finished_jobs_are_placed_again_with_a_new_ground(
    geo_service: Callable[..., RunningService], capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli.commands import run

    service = geo_service()
    jobs = survey(service, BEFORE, "survey-1")
    placed = {j["id"]: j["result"] for j in jobs}
    # As a job stored before geometry was worked out has it: none.
    db = service.settings.database
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE results SET geo = NULL, west = NULL, south = NULL, east = NULL, north = NULL"
        )
        conn.execute("UPDATE detections SET geo = NULL, size_m = NULL")
    bare = service.client.get(f"/v1/jobs/{jobs[0]['id']}").json()["result"]
    assert bare["geo"] is None and "geo" not in bare["detections"][0]
    assert service.client.get("/v1/jobs", params={"min_size_m": "1"}).json()["jobs"] == []

    answer = service.client.post("/v1/georeference", params={"flight": "survey-1"}, json={})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"jobs": 2, "located": 2, "detections": 3}
    for job_id, result in placed.items():
        again = service.client.get(f"/v1/jobs/{job_id}").json()["result"]
        assert again["geo"] == result["geo"] and again["detections"] == result["detections"]
    assert len(service.client.get("/v1/jobs", params={"min_size_m": "1"}).json()["jobs"]) == 2

    # The ground is 50 m above sea level, 30 m below the drone (absolute altitude 80 m).
    assert run(["georeference", "--flight", "survey-1", "--ground-elevation", "50",
                "--url", service.url]) == 0  # fmt: skip
    assert "placed 2 finished jobs again: 2 frames and 3 detections" in capsys.readouterr().out
    lower = service.client.get(f"/v1/jobs/{jobs[1]['id']}").json()
    assert lower["params"]["ground_elevation"] == 50
    tent = lower["result"]["detections"][0]["geo"]
    assert tent["width_m"] == pytest.approx(3.0 * 30 / 50, rel=0.06)
    sizes = service.client.get("/v1/flights/survey-1").json()["sizes"]
    assert sizes["tent"]["max"] == pytest.approx(3.0 * 30 / 50, rel=0.06)

    # Back to flat ground at take-off height: the parameter goes too.
    assert (
        service.client.post(
            "/v1/georeference", params={"flight": "survey-1"}, json={"ground_elevation": None}
        ).json()["jobs"]
        == 2
    )
    back = service.client.get(f"/v1/jobs/{jobs[1]['id']}").json()
    assert "ground_elevation" not in back["params"]
    assert back["result"]["detections"] == placed[jobs[1]["id"]]["detections"]

    for body, params in (
        ({"ground_elevation": 10_000}, {}),
        ({"ground_elevation": "high"}, {}),
        ({"elevation": 3}, {}),
        ({}, {"status": "failed"}),
    ):
        refused = service.client.post("/v1/georeference", params=params, json=body)
        assert refused.status_code == 422, (body, params, refused.text)


def test_the_report_of_a_flight_since_another_opens_whole_in_a_browser(
    geo_service: Callable[..., RunningService], browser: Any, tmp_path: Path
) -> None:
    service = geo_service()
    survey(service, BEFORE, "survey-1")
    survey(service, AFTER, "survey-2")
    context = browser.new_context(viewport={"width": 1100, "height": 1500})
    fetched: list[str] = []
    context.on("request", lambda request: fetched.append(request.url))
    try:
        page = context.new_page()
        page.goto(f"{service.url}/v1/reports/survey-2?since=survey-1")
        assert fetched == [f"{service.url}/v1/reports/survey-2?since=survey-1"]  # nothing else
        assert page.locator("svg#map polygon.frame-footprint").count() == 2
        assert page.locator("svg#map g.detection").count() == 3
        for kind in ("new", "gone", "moved"):
            mark = page.locator(f"svg#map g.change-{kind}")
            assert mark.count() == 1 and mark.bounding_box()["width"] > 0
        labels = page.locator("#label-counts tbody tr td:first-child").all_inner_texts()
        assert [label.strip() for label in labels] == ["car"]
        images = page.locator("section.frame img.annotated")
        assert images.count() == 2
        assert images.evaluate_all("all => all.every(i => i.complete && i.naturalWidth > 0)")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot))
        assert len(set(Image.open(shot).convert("RGB").getdata())) > 200
        if os.environ.get("AIP_WRITE_SCREENSHOTS") == "1":  # the README's
            shutil.copyfile(shot, Path(__file__).parents[1] / "docs/screenshots/report.png")
    finally:
        context.close()
