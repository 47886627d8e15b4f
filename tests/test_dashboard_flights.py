"""The dashboard's map and flight pages in a real headless Chromium against the real app, on
two planted surveys: frames, their footprints and located detections on the map, a flight
filter, the flights listed, one flight's sizes, its report opened with a token, and what
changed between the surveys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.conftest import RunningService
from tests.test_dashboard import pages, shot, until
from tests.test_geo_service import AFTER, BEFORE, geo_service, survey

__all__ = ["geo_service", "pages"]  # fixtures used by name

TOKEN = "flight-token-1"


def surveyed(start: Callable[..., RunningService], **changes: Any) -> RunningService:
    service = start(**changes)
    survey(service, BEFORE, "survey-1")
    survey(service, AFTER, "survey-2")
    return service


def frames_drawn(page: Any) -> int:
    """Frames on the map: single points plus each cluster's count."""
    clusters = page.locator("#map .cluster text").all_text_contents()
    return int(page.locator("#map a.point").count() + sum(int(n) for n in clusters))


def test_the_map_draws_frames_footprints_and_detections_and_filters_by_flight(
    geo_service: Callable[..., RunningService], pages: Callable[[], Any], tmp_path: Path
) -> None:
    service = surveyed(geo_service)
    page = pages()
    page.goto(service.url + "/map")
    page.wait_for_selector("#map")
    # Both surveys flew over the same two spots: two clusters of two frames.
    assert frames_drawn(page) == 4
    assert page.locator("#map polygon.footprint").count() == 4
    shapes = page.locator("#map a.detection polygon")
    assert shapes.count() == 6  # 3 planted objects per survey
    for i in range(shapes.count()):
        box = shapes.nth(i).bounding_box()
        assert box is not None and box["width"] > 0 and box["height"] > 0
    titles = page.locator("#map a.detection title").all_text_contents()
    assert sum("tent 3.0 × 3.0 m" in t for t in titles) == 1, titles
    assert sum(t.startswith("car 4.0 × 2.0 m · job #") for t in titles) == 5, titles
    # Under the frames: drawn first, so the points and clusters stay clickable on top.
    order = page.evaluate(
        "[...document.querySelectorAll('#map > *')].map((n) => n.getAttribute('class'))"
    )
    assert order.index("footprints") < order.index("detections") < order.index("cluster")
    assert page.locator("#map #north").count() == 1 and page.text_content("#map #scale")

    options = page.locator("#map-flight option").all_inner_texts()
    assert options[0] == "All flights" and sorted(options[1:]) == ["survey-1", "survey-2"]
    page.select_option("#map-flight", "survey-1")
    until(page, "document.querySelectorAll('#map a.detection').length === 3")
    assert page.locator("#map a.point").count() == 2 and page.locator("#map .cluster").count() == 0
    assert page.locator("#map polygon.footprint").count() == 2
    assert page.url.endswith("/map?flight=survey-1")
    titles = page.locator("#map a.detection title").all_text_contents()
    assert sorted(t.split(" ")[0] for t in titles) == ["car", "car", "tent"]
    shot(page, tmp_path, "map-flight")
    # The filter is in the address: a reload keeps it.
    page.reload()
    page.wait_for_selector("#map")
    assert page.locator("#map a.detection").count() == 3
    assert page.eval_on_selector("#map-flight", "s => s.value") == "survey-1"


def test_flights_are_listed_and_a_flights_page_opens_its_report_and_compares(
    geo_service: Callable[..., RunningService], pages: Callable[[], Any], tmp_path: Path
) -> None:
    service = surveyed(geo_service, token=TOKEN)
    page = pages()
    page.goto(service.url + "/flights")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", TOKEN)
    page.click("#token-form button")
    page.wait_for_selector("#flights tr[data-flight='survey-1']")
    rows = page.locator("#flights tr")
    assert {rows.nth(i).get_attribute("data-flight") for i in range(rows.count())} == {
        "survey-1",
        "survey-2",
    }
    first = page.locator("#flights tr[data-flight='survey-1']")
    assert first.locator("[data-label='car']").inner_text().strip() == "2 car"
    assert first.locator("[data-label='tent']").inner_text().strip() == "1 tent"
    assert "2 / 2" in first.inner_text() and "3,375 m²" in first.inner_text()
    assert page.locator("nav a.current").inner_text() == "Flights"
    shot(page, tmp_path, "flights")

    page.click("#flights a[href='/flights/survey-2']")
    page.wait_for_selector("#flight-labels")
    car = page.locator("#flight-labels tr[data-label='car'] td").all_inner_texts()
    assert [c.strip() for c in car] == ["car", "3", "4.0 m", "4.0 m", "4.0 m"]
    assert page.locator("#flight-jobs a").count() == 2
    assert page.locator("#flight-summary [data-key='located']").inner_text() == "2 of 2"

    # The report needs the token, which a link cannot carry: the dashboard's report page reads
    # it with the token and becomes it, inline styles and all, with nothing refused.
    refused: list[str] = []
    page.context.on(
        "console",
        lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None,
    )
    with page.context.expect_page() as opened:
        page.click("#report-open")
    report = opened.value
    report.wait_for_selector("svg#map")
    assert report.url == f"{service.url}/reports/survey-2"
    assert report.locator("#token-dialog").count() == 0  # the token came with the tab
    assert report.locator("svg#map g.detection").count() == 3
    assert report.evaluate("getComputedStyle(document.body).maxWidth") == "1100px"  # styled
    report.close()

    page.select_option("#compare", "survey-1")
    page.wait_for_selector("#changes-counts")
    tallies = {
        kind: page.get_attribute(f"#changes-counts li[data-kind='{kind}']", "data-count")
        for kind in ("new", "gone", "moved", "same")
    }
    assert tallies == {"new": "1", "gone": "1", "moved": "1", "same": "1"}
    kinds = page.locator("#changes-list tbody tr").evaluate_all("rs => rs.map(r => r.dataset.kind)")
    assert kinds == ["new", "gone", "moved"]
    assert "8." in page.locator("#changes-list tr[data-kind='moved']").inner_text()
    shot(page, tmp_path, "flight")
    with page.context.expect_page() as opened:
        page.click("#report-since")
    since = opened.value
    since.wait_for_selector("svg#map")
    assert since.url == f"{service.url}/reports/survey-2?since=survey-1"
    for kind in ("new", "gone", "moved"):
        assert since.locator(f"svg#map g.change-{kind}").count() == 1
    since.close()
    assert not refused, refused


def test_a_flight_named_with_slashes_has_a_page_and_a_missing_one_says_so(
    geo_service: Callable[..., RunningService], pages: Callable[[], Any]
) -> None:
    service = geo_service()
    survey(service, BEFORE, "north field/day 1")
    page = pages()
    page.goto(service.url + "/flights")
    link = page.locator("#flights a").first
    link.wait_for()
    assert link.get_attribute("href") == "/flights/" + quote("north field/day 1", safe="")
    link.click()
    page.wait_for_selector("#flight-labels")
    assert page.inner_text("main h1").startswith("Flight north field/day 1")
    assert page.locator("#compare").count() == 0  # nothing to compare with
    # Without a token the report is a plain link: the browser follows it itself.
    with page.context.expect_page() as opened:
        page.click("#report-open")
    opened.value.wait_for_selector("svg#map")
    assert opened.value.title().startswith("Flight report")
    opened.value.close()
    page.goto(service.url + "/flights/north field/day 1")  # typed with its raw slash
    page.wait_for_selector("#flight-labels")
    assert page.url.endswith("/flights/north%20field%2Fday%201")

    answer = page.goto(service.url + "/flights/nope")
    assert answer is not None and answer.status == 200
    page.wait_for_selector("#missing")
    assert page.inner_text("#missing h1") == "No such flight"
    assert page.locator("#missing a[href='/flights']").count() == 1
    for path in ("/flights", "/flights/a%2Fb", "/flights/a/b", "/reports/a%2Fb"):
        served = service.client.get(path)
        assert served.status_code == 200 and served.headers["content-type"].startswith("text/html")
        policy = served.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self';" in policy
        # Inline styles only where a report is shown: the report's own are inline.
        assert ("'unsafe-inline'" in policy) == path.startswith("/reports/")
