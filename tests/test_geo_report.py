"""The flight report: one self-contained HTML file that refers to nothing outside itself,
opened in a real headless Chromium with every network request refused, its map, tables and
annotated frames looked at element by element and on its screenshot; hostile labels stay
text; and its PDF through the same Chromium, with errors worded for people."""

from __future__ import annotations

import base64
import io
import re
import stat
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pymap3d
import pytest
from PIL import Image, ImageDraw

from service.geo.pdf import PdfError, find_converter, html_to_pdf
from service.geo.report import SVG_NS, render_report
from tests.conftest import _chromium

ORIGIN = (51.5, -0.12)  # take-off point, lat/lon
HOSTILE = "<script>alert(1)</script>"
HOSTILE_REASONING = 'Two cars. <img src="https://evil.example/x.png" onerror="alert(2)">'
FOOTPRINT_W, FOOTPRINT_H = 60.0, 45.0  # metres east-west and north-south of a nadir frame
ASSUMED = ["flat ground at take-off height", "sensor width from the 35 mm equivalent focal length"]


def lonlat(east: float, north: float) -> list[float]:
    lat, lon, _ = pymap3d.enu2geodetic(east, north, 0.0, ORIGIN[0], ORIGIN[1], 0.0)
    return [float(lon), float(lat)]


def rect(east: float, north: float, width: float, height: float) -> list[list[float]]:
    """A closed ring, width metres east-west by height metres north-south, centred there."""
    w, h = width / 2, height / 2
    corners = [(-w, h), (w, h), (w, -h), (-w, -h), (-w, h)]
    return [lonlat(east + dx, north + dy) for dx, dy in corners]


def located_detection(number: int, label: str, east: float, north: float) -> dict[str, Any]:
    lon, lat = lonlat(east, north)
    return {
        "number": number,
        "label": label,
        "box": [100, 100, 180, 140],
        "geo": {
            "lat": lat,
            "lon": lon,
            "footprint": rect(east, north, 4.0, 2.0),
            "width_m": 4.0,
            "height_m": 2.0,
            "area_m2": 8.0,
            "distance_m": 80.0,
            "uncertainty_m": 3.4,
        },
    }


def unlocated_detection(number: int, label: str) -> dict[str, Any]:
    return {
        "number": number,
        "label": label,
        "box": [0, 0, 40, 40],
        "geo": {"reason": "a box corner is above the horizon"},
    }


def job(
    job_id: int,
    second: int,
    detections: list[dict[str, Any]],
    east: float | None,
    answer: dict[str, Any] | None = None,
    reasoning: str = "",
) -> dict[str, Any]:
    """A job view as the API gives it; `east` None: a frame without a position."""
    if east is None:
        geo: dict[str, Any] = {"reason": "no GPS position in EXIF", "assumptions": []}
    else:
        lon, lat = lonlat(east, 0.0)
        geo = {
            "camera": {"lat": lat, "lon": lon, "height_m": 80.0, "yaw": 0.0, "pitch": -90.0,
                       "roll": 0.0, "focal_px": 3666.7, "sensor_width_mm": 13.2,
                       "model": "FC6310"},
            "assumptions": ASSUMED,
            "centre": {"lat": lat, "lon": lon},
            "footprint": rect(east, 0.0, FOOTPRINT_W, FOOTPRINT_H),
            "gsd_cm": 2.19,
            "uncertainty_m": 3.1,
        }  # fmt: skip
    return {
        "id": job_id,
        "status": "succeeded",
        "source": "inbox",
        "source_path": f"site-a/f1/DJI_{job_id:04d}.JPG",
        "flight": "site-a/f1",
        "input": {
            "name": f"DJI_{job_id:04d}.JPG",
            "width": 4000,
            "height": 3000,
            "captured_at": f"2026-11-23T08:00:{second:02d}",
        },
        "result": {
            "detections": detections,
            "geo": geo,
            "reasoning": reasoning,
            "answer": answer,
        },
    }


def jobs() -> list[dict[str, Any]]:
    # Listed out of capture order: the report orders by capture time.
    return [
        job(2, 10, [located_detection(1, "person", 52.0, 5.0), unlocated_detection(2, "car")],
            east=50.0, answer={"vehicles": 1, "flooded": False}),
        job(1, 5, [located_detection(1, "car", -8.0, 6.0),
                   located_detection(2, HOSTILE, 5.0, -7.0)], east=0.0, reasoning=HOSTILE_REASONING,
            answer={"vehicles": 2, "damage": {"roof": True, "walls": [1, 2]}, "note": "<b>x</b>"}),
        job(3, 15, [], east=100.0),
        job(4, 20, [{"number": 1, "label": "person", "box": [5, 5, 60, 90], "geo": None}],
            east=None),
    ]  # fmt: skip


FLIGHT = {
    "id": "site-a/f1",
    "explicit": True,
    "started": "2026-11-23T08:00:05",
    "ended": "2026-11-23T08:00:20",
    "frames": 4,
    "located": 3,
    "area_m2": 8700.0,
    "bbox": [*lonlat(-30, -22.5), *lonlat(130, 22.5)],
    "counts": {"car": 2, "person": 2, HOSTILE: 1},
    "sizes": {"car": {"min": 4.0, "median": 4.0, "max": 4.0},
              "person": {"min": 4.0, "median": 4.0, "max": 4.0},
              HOSTILE: {"min": 4.0, "median": 4.0, "max": 4.0}},
    "job_ids": [1, 2, 3, 4],
}  # fmt: skip


def ref(job_id: int, number: int, east: float, north: float) -> dict[str, Any]:
    lon, lat = lonlat(east, north)
    return {"job_id": job_id, "number": number, "lat": lat, "lon": lon, "uncertainty_m": 3.0}


CHANGES = {
    "counts": {"new": 1, "gone": 1, "moved": 1, "same": 2, "unseen": 0, "unseen_before": 0},
    "new": [{"kind": "new", "label": HOSTILE, "before": None, "after": ref(1, 2, 5.0, -7.0),
             "covered_by": [101]}],
    "gone": [{"kind": "gone", "label": "truck", "before": ref(101, 3, 90.0, 10.0),
              "after": None, "covered_by": [3]}],
    "moved": [{"kind": "moved", "label": "car", "before": ref(101, 1, -20.0, 6.0),
               "after": ref(1, 1, -8.0, 6.0), "distance_m": 12.0, "tolerance_m": 8.5}],
    "same": [], "unseen": [], "unseen_before": [],
}  # fmt: skip


def annotated(seed: int) -> bytes:
    image = Image.new("RGB", (640, 480), (70 + seed * 20, 110, 90))
    draw = ImageDraw.Draw(image)
    for x in range(0, 640, 32):
        draw.rectangle((x, 0, x + 14, 240), fill=(x % 255, 200 - seed * 30, 60))
    draw.rectangle((100, 100, 180, 140), outline=(230, 25, 75), width=4)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


FRAMES = {1: annotated(1), 2: annotated(2), 4: annotated(3)}  # the frames with detections


def render(**changes: Any) -> str:
    return render_report(FLIGHT, jobs(), FRAMES, generated_at="2026-11-28T21:00:00Z", **changes)


class References(HTMLParser):
    """Every attribute value and every <style> text of a document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.attributes: list[tuple[str, str, str]] = []
        self.styles: list[str] = []
        self.tags: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_style = tag == "style"
        self.attributes += [(tag, name, value or "") for name, value in attrs]

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self._in_style = False

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)


def test_the_report_refers_to_nothing_outside_itself() -> None:
    html = render(changes=CHANGES)
    parsed = References()
    parsed.feed(html)
    parsed.close()
    # The only URL-like attribute is the SVG namespace, which names, and loads, nothing.
    urls = [(t, n, v) for t, n, v in parsed.attributes if "://" in v or v.startswith("//")]
    assert urls == [("svg", "xmlns", SVG_NS)]
    for tag, name, value in parsed.attributes:
        if name in ("src", "href", "xlink:href", "srcset", "poster", "data", "action"):
            assert value.startswith(("data:", "#")), (tag, name, value[:80])
        assert not value.lstrip().lower().startswith("javascript:"), (tag, name)
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(parsed.tags)
    assert not any(n.startswith("on") for _, n, _ in parsed.attributes)
    style = "".join(parsed.styles)
    assert "@import" not in style and "url(" not in style
    # In the raw text, any http(s):// besides the namespace is escaped user text, never markup.
    assert html.count('src="//') == 0 and html.count("src='//") == 0
    outside = html.replace(f'xmlns="{SVG_NS}"', "")
    for found in re.finditer(r"https?://", outside):
        before = outside[max(0, found.start() - 60) : found.start()]
        assert "&quot;" in before or "&lt;" in before, before  # inside escaped text
    assert html.count(f'xmlns="{SVG_NS}"') == 1
    assert len(parsed.styles) == 1  # the one inline stylesheet


def test_hostile_text_is_escaped_everywhere() -> None:
    html = render(changes=CHANGES)
    assert HOSTILE not in html and "<b>x</b>" not in html and "<img src=" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=&quot;https://evil.example/x.png&quot;" in html
    assert html.count("<img ") == len(FRAMES)


def test_without_any_located_frame_there_is_no_map_and_it_says_so() -> None:
    only = [j for j in jobs() if j["id"] == 4]
    html = render_report({"id": "f"}, only, {}, generated_at="now")
    assert "<svg" not in html and 'id="map"' in html and "no map" in html
    assert "no GPS position in EXIF" in html and "No annotated image." in html


def test_a_large_frame_is_embedded_smaller_and_a_small_one_as_given() -> None:
    big = Image.new("RGB", (4000, 3000), (90, 140, 60))
    ImageDraw.Draw(big).rectangle((1000, 1000, 1800, 1400), outline=(230, 25, 75), width=12)
    out = io.BytesIO()
    big.save(out, format="JPEG", quality=90)
    html = render_report(
        FLIGHT, jobs(), {1: out.getvalue(), 2: FRAMES[2]}, generated_at="2026-11-28T21:00:00Z"
    )
    embedded = [
        base64.b64decode(uri) for uri in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', html)
    ]
    assert len(embedded) == 2
    with Image.open(io.BytesIO(embedded[0])) as first:
        assert first.size == (1600, 1200)
    assert embedded[1] == FRAMES[2]


class Network:
    """Refuses every request that is not the report's own file, and remembers it."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def __call__(self, route: Any) -> None:
        url = route.request.url
        if url.startswith("file://"):
            route.continue_()
        else:
            self.refused.append(url)
            route.abort()


def boxes(page: Any, selector: str) -> list[dict[str, float]]:
    found = page.locator(selector)
    return [found.nth(i).bounding_box() for i in range(found.count())]


def inside(box: dict[str, float], outer: dict[str, float]) -> bool:
    return (
        box["x"] >= outer["x"] - 0.5
        and box["y"] >= outer["y"] - 0.5
        and box["x"] + box["width"] <= outer["x"] + outer["width"] + 0.5
        and box["y"] + box["height"] <= outer["y"] + outer["height"] + 0.5
    )


def colours(path: Path) -> int:
    with Image.open(path) as image:
        found = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(found or [])


def test_the_report_in_headless_chromium_without_network(browser: Any, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    report.write_text(render(changes=CHANGES), encoding="utf-8")
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    network = Network()
    context.route("**/*", network)
    complaints: list[str] = []
    requests: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda error: complaints.append(str(error)))
    page.on("console", lambda message: complaints.append(message.text))
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto(report.as_uri(), wait_until="load")

        assert network.refused == []
        assert [url for url in requests if not url.startswith(("file://", "data:"))] == []
        assert complaints == []  # no script ran, and the page's CSP refused nothing
        assert page.locator("script").count() == 0

        # The map: one footprint per located frame, one mark per located detection, all
        # drawn with a size and inside the map.
        map_box = page.locator("svg#map").bounding_box()
        assert map_box and map_box["width"] > 500 and map_box["height"] > 300
        footprints = boxes(page, "svg#map polygon.frame-footprint")
        marks = boxes(page, "svg#map g.detection")
        assert len(footprints) == 3 and len(marks) == 3
        for box in footprints + marks:
            assert box["width"] > 0 and box["height"] > 0 and inside(box, map_box), box
        labels = page.locator("svg#map g.detection").evaluate_all(
            "marks => marks.map(m => m.dataset.label)"
        )
        assert sorted(labels) == sorted(["car", HOSTILE, "person"])
        assert page.locator("svg#map polyline.flight-path").count() == 1
        assert page.locator("svg#map circle.camera-position").count() == 3
        for kind in ("new", "gone", "moved"):
            drawn = boxes(page, f"svg#map g.change-{kind}")
            assert len(drawn) == 1 and inside(drawn[0], map_box), kind

        # North up and one scale for both axes: a nadir frame's footprint, 60 m east-west by
        # 45 m north-south, measured against the scale bar.
        bar = [
            page.locator(f"#scale-bar rect.{p}").bounding_box() for p in ("bar-dark", "bar-light")
        ]
        bar_px = bar[0]["width"] + bar[1]["width"]
        bar_m = float(page.locator("#scale-bar text").nth(1).text_content().removesuffix(" m"))
        per_metre = bar_px / bar_m
        first = footprints[0]
        assert first["width"] / per_metre == pytest.approx(FOOTPRINT_W, rel=0.02)
        assert first["height"] / per_metre == pytest.approx(FOOTPRINT_H, rel=0.02)
        arrow = page.locator("#north-arrow polygon").bounding_box()
        assert arrow and inside(arrow, map_box)

        # Counts per label: one row each, hostile label as text.
        rows = page.locator("#label-counts tbody tr")
        assert rows.count() == 3
        table = {
            rows.nth(i).locator("td").nth(0).inner_text().strip(): [
                rows.nth(i).locator("td").nth(c).inner_text() for c in (1, 2, 5)
            ]
            for i in range(rows.count())
        }
        assert table == {"car": ["2", "1", "4.0"], "person": ["2", "1", "4.0"],
                         HOSTILE: ["1", "1", "4.0"]}  # fmt: skip

        # A section per frame with detections, in capture order, each image decoded.
        sections = page.locator("section.frame")
        assert sections.evaluate_all("s => s.map(e => e.dataset.job)") == ["1", "2", "4"]
        for i in range(sections.count()):
            image = sections.nth(i).locator("img.annotated")
            assert image.count() == 1
            assert image.evaluate("img => img.complete && img.naturalWidth") == 640
        assert page.locator("img").count() == len(FRAMES)  # the hostile <img> is text
        assert HOSTILE_REASONING in page.locator("#frame-1 .reasoning").inner_text()
        assert page.locator("#frame-1 table.frame-detections tbody tr").count() == 2
        assert "above the horizon" in page.locator("#frame-2").inner_text()
        assert "no GPS position in EXIF" in page.locator("#frame-list").inner_text()

        # Structured answers: a row per answered job, a column per field.
        heads = page.locator("#answers thead th").all_inner_texts()
        assert heads == ["Frame", "vehicles", "damage", "note", "flooded"]
        answers = page.locator("#answers tbody tr")
        assert answers.count() == 2
        assert answers.nth(0).locator("td").all_inner_texts() == [
            "DJI_0001.JPG", "2", '{"roof":true,"walls":[1,2]}', "<b>x</b>", ""
        ]  # fmt: skip

        assumptions = page.locator("#assumptions li").all_inner_texts()
        assert [a.split(" (")[0] for a in assumptions[:2]] == ASSUMED
        changed = page.locator("#changes tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.kind)"
        )
        assert changed == ["new", "gone", "moved"]
        assert page.locator("#changes").inner_text().count(HOSTILE) == 1

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert colours(shot) > 500  # a rendered page, not a blank one
        map_shot = tmp_path / "map.png"
        page.locator("svg#map").screenshot(path=str(map_shot))
        assert colours(map_shot) > 20
        assert network.refused == []
    finally:
        context.close()


def converter() -> str:
    """The Chromium that prints PDFs: skipped without one, as the browser tests are; with CI
    set, installed as they install it, and a must."""
    chromium = _chromium()  # on CI installed when missing, or the test fails
    found = find_converter() or (str(chromium) if chromium else None)
    if found is None:
        pytest.skip(
            "PDF test skipped: install Chromium (Debian: apt-get install chromium) or set "
            "AIP_CHROMIUM to a Chromium binary; with CI set it installs it and must run"
        )
    return found


def test_the_report_prints_to_a_pdf(tmp_path: Path) -> None:
    converter()
    target = tmp_path / "out" / "report.pdf"
    html_to_pdf(render(changes=CHANGES), target)
    data = target.read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    # The summary and map, then a page per frame with detections.
    assert len(re.findall(rb"/Type\s*/Page\b", data)) >= 4


def fake_browser(tmp_path: Path, script: str) -> Path:
    path = tmp_path / "fake-chromium"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_pdf_errors_say_what_went_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.pdf"
    monkeypatch.setenv("AIP_CHROMIUM", str(tmp_path / "missing"))
    assert find_converter() is None
    with pytest.raises(PdfError, match=r"AIP_CHROMIUM=.*missing.*install Chromium"):
        html_to_pdf("<p>x</p>", target)

    failing = fake_browser(tmp_path, 'echo "first line" >&2; echo "profile is locked" >&2; exit 3')
    monkeypatch.setenv("AIP_CHROMIUM", str(failing))
    assert find_converter() == str(failing)
    with pytest.raises(PdfError, match=r"failed \(exit status 3\): profile is locked"):
        html_to_pdf("<p>x</p>", target)

    silent = fake_browser(tmp_path, "exit 0")
    monkeypatch.setenv("AIP_CHROMIUM", str(silent))
    with pytest.raises(PdfError, match="finished without writing one"):
        html_to_pdf("<p>x</p>", target)

    stuck = fake_browser(tmp_path, "sleep 30 & sleep 30")
    monkeypatch.setenv("AIP_CHROMIUM", str(stuck))
    with pytest.raises(PdfError, match="took longer than 1 s"):
        html_to_pdf("<p>x</p>", target, timeout=1)
    assert not target.exists()
