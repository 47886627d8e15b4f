"""The dashboard in a real headless Chromium against the real app: drop an image, watch it
finish live, see its boxes drawn and toggled, filter the list, load and unload a model, the
token asked once; and the browser guard and CSP on every page and asset."""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.detection import Detection, encode_mask
from tests.conftest import RunningService, gate_detector, make_image, make_settings

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshots" / "job.png"
WAIT_MS = 60_000


class PlacedDetector:
    """Boxes a test can count: one per `person` query, two for any other label."""

    def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
        width, height = image.size
        if query == "person":  # with a mask over its box
            box = (width * 0.7, height * 0.5, width * 0.8, height * 0.9)
            inside = np.zeros((height, width), dtype=bool)
            inside[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = True
            return [Detection(query, box, image.size, mask=encode_mask(inside))]
        return [
            Detection(
                query,
                (width * (0.1 + 0.3 * i), height * 0.2, width * (0.3 + 0.3 * i), height * 0.6),
                image.size,
            )
            for i in range(2)
        ]


@pytest.fixture
def dashboard(
    serve: Callable[..., RunningService], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., RunningService]:
    def start(**changes: Any) -> RunningService:
        service = serve(make_settings(tmp_path, **changes))
        detector = service.services.host.roles["detector"]
        monkeypatch.setattr(detector, "runtime", PlacedDetector())
        return service

    return start


@pytest.fixture
def pages(browser: Any, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """New pages in one browser context; a script error or a CSP refusal on any of them fails
    the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(WAIT_MS)
    errors: list[str] = []

    def refused(text: str) -> None:
        if "Content Security Policy" in text:
            errors.append(text)

    def new_page() -> Any:
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        # Something the page does that its own Content-Security-Policy refuses.
        page.on("console", lambda message: refused(message.text))
        return page

    yield new_page
    context.close()
    assert not errors, errors


def until(page: Any, expression: str) -> None:
    """Wait for `expression` to hold in the page. Playwright's wait_for_function polls by
    evaluating a string inside the page, which the page's own CSP refuses (no unsafe-eval);
    page.evaluate goes through the debugger protocol, which the CSP does not govern."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        page.wait_for_timeout(50)


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    """A screenshot kept with the test's artifacts (its tmp dir)."""
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def geotagged(lat: float, lon: float) -> bytes:
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (lat, 0.0, 0.0), 3: "E", 4: (lon, 0.0, 0.0)}
    return make_image(480, 320, exif=exif.tobytes())


DROP = """async ({name, data}) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
    const zone = document.getElementById("dropzone");
    for (const type of ["dragenter", "dragover", "drop"]) {
        const init = {dataTransfer: transfer, bubbles: true, cancelable: true};
        zone.dispatchEvent(new DragEvent(type, init));
    }
}"""


def test_a_dropped_image_finishes_live_and_its_page_draws_its_boxes(
    dashboard: Callable[..., RunningService], pages: Callable[[], Any], tmp_path: Path
) -> None:
    service = dashboard()
    jobs = pages()
    jobs.goto(service.url + "/")
    jobs.wait_for_selector("#live[data-state='live']")  # on /v1/events, not polling
    jobs.evaluate("window.stayed = true")  # gone if the page reloads
    submit = pages()
    submit.goto(service.url + "/submit")
    submit.fill("input[name=queries]", "person, vehicle")
    submit.fill("textarea[name=prompt]", "What is on the road?")
    data = base64.b64encode(geotagged(52.5, 13.25)).decode()
    submit.evaluate(DROP, {"name": "road.jpg", "data": data})
    submit.wait_for_selector("#uploads tr[data-job]")
    job_id = int(submit.get_attribute("#uploads tr[data-job]", "data-job") or 0)
    submit.wait_for_selector(f"#uploads tr[data-job='{job_id}'][data-status='succeeded']")
    shot(submit, tmp_path, "submit")

    # The list shows the job finished without a reload.
    jobs.wait_for_selector(f"#jobs tr[data-job='{job_id}'][data-status='succeeded']")
    assert jobs.evaluate("window.stayed") is True
    shot(jobs, tmp_path, "jobs")

    job = service.client.get(f"/v1/jobs/{job_id}").json()
    detections = job["result"]["detections"]
    assert [d["label"] for d in detections].count("vehicle") == 2 and len(detections) == 3
    jobs.click(f"#jobs tr[data-job='{job_id}'] a")
    jobs.wait_for_url(f"**/jobs/{job_id}")
    jobs.wait_for_selector("#figure svg.boxes")
    until(jobs, "document.getElementById('frame').naturalWidth > 0")
    drawn = jobs.locator("#figure svg.boxes g.detection")
    assert drawn.count() == len(detections)
    assert jobs.locator("#figure svg.boxes g.detection rect").count() == len(detections)
    assert (
        jobs.locator("#figure svg.boxes g.detection[data-label='person'] image.mask").count() == 1
    )
    numbers = [drawn.nth(i).get_attribute("data-number") for i in range(drawn.count())]
    assert numbers == [str(d["number"]) for d in detections]
    assert jobs.inner_text("#prompt") == "What is on the road?"
    assert jobs.inner_text("#location").startswith("52.500000, 13.250000")
    assert "[object" not in jobs.inner_text("main")
    shot(jobs, tmp_path, "job")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "screenshots" / "job.png", SCREENSHOT)

    visible = "#figure svg.boxes g.detection:not(.hidden)"
    jobs.uncheck("#labels input[data-label='vehicle']")
    assert jobs.locator(visible).count() == 1
    assert jobs.get_attribute(visible, "data-label") == "person"
    jobs.check("#labels input[data-label='vehicle']")
    assert jobs.locator(visible).count() == 3

    # The tiny reasoner's text cites nothing: the page is given an answer that does.
    def citing(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        body["result"]["reasoning"] = "Two vehicles [2, 3] stand apart. A person (#1) waits."
        route.fulfill(response=response, json=body)

    jobs.route(f"**/v1/jobs/{job_id}", citing)
    jobs.reload()
    cited = "#figure svg.boxes g.detection.cited"
    jobs.hover("#reasoning .cites >> nth=0")
    assert [jobs.locator(cited).nth(i).get_attribute("data-number") for i in range(2)] == ["2", "3"]
    assert jobs.locator(cited).count() == 2
    jobs.hover("#reasoning .cites >> nth=1")
    assert jobs.locator(cited).count() == 1 and jobs.get_attribute(cited, "data-number") == "1"
    jobs.hover("#prompt")
    assert jobs.locator(cited).count() == 0
    jobs.unroute(f"**/v1/jobs/{job_id}")

    jobs.fill("#ask input[name=question]", "How many vehicles?")
    jobs.click("#ask button")
    jobs.wait_for_selector(".followup")
    asked = service.client.get(f"/v1/jobs/{job_id}").json()["followups"]
    assert [f["question"] for f in asked] == ["How many vehicles?"]
    assert "How many vehicles?" in jobs.inner_text(".followup")


def test_the_list_polls_without_the_stream_and_filters_by_label_and_status(
    dashboard: Callable[..., RunningService], pages: Callable[[], Any], tmp_path: Path
) -> None:
    service = dashboard()
    people = service.submit(make_image(color=(10, 10, 10)), queries="person").json()["id"]
    vehicles = service.submit(make_image(color=(200, 10, 10)), queries="vehicle").json()["id"]
    for job_id in (people, vehicles):
        assert service.wait(job_id)["status"] == "succeeded"
    page = pages()
    page.route("**/v1/events*", lambda route: route.abort())  # no stream: the page polls
    page.goto(service.url + "/")
    page.wait_for_selector(f"#jobs tr[data-job='{people}']")
    page.wait_for_selector("#live[data-state='polling']")
    later = service.submit(make_image(color=(90, 90, 90)), queries="person").json()["id"]
    page.wait_for_selector(f"#jobs tr[data-job='{later}'][data-status='succeeded']")
    assert page.locator("#jobs tr[data-job]").count() == 3

    page.fill("#filters input[name=label]", "vehicle")
    page.fill("#filters input[name=min_count]", "2")
    page.click("#filters button[type=submit]")
    page.wait_for_selector(f"#jobs tr[data-job='{people}']", state="detached")
    assert page.locator("#jobs tr[data-job]").count() == 1
    assert page.get_attribute("#jobs tr[data-job]", "data-job") == str(vehicles)
    assert "label=vehicle" in page.url  # a filtered view can be bookmarked
    shot(page, tmp_path, "jobs-filtered")

    page.fill("#filters input[name=label]", "")
    page.fill("#filters input[name=min_count]", "")
    page.select_option("#filters select[name=status]", "failed")
    page.click("#filters button[type=submit]")
    page.wait_for_selector("#jobs tr[data-job]", state="detached")
    assert "No jobs match" in page.inner_text("#jobs tbody")


def test_the_models_page_unloads_and_loads_a_model(
    dashboard: Callable[..., RunningService], pages: Callable[[], Any], tmp_path: Path
) -> None:
    service = dashboard()
    page = pages()
    page.goto(service.url + "/models")
    card = "#models article[data-role='reasoner']"
    page.wait_for_selector(f"{card}[data-state='loaded']")
    source = service.services.host.roles["reasoner"].target.source
    assert source in page.inner_text(card) and "[object" not in page.inner_text("main")
    page.click(f"{card} button.unload")
    page.wait_for_selector(f"{card}[data-state='unloaded']")
    assert service.client.get("/v1/models").json()["roles"][1]["state"] == "unloaded"
    page.click(f"{card} button.load")
    page.wait_for_selector(f"{card}[data-state='loaded']")
    roles = {r["role"]: r["state"] for r in service.client.get("/v1/models").json()["roles"]}
    assert roles["reasoner"] == "loaded"
    shot(page, tmp_path, "models")


def test_the_token_is_asked_once_per_browser_session(
    dashboard: Callable[..., RunningService], pages: Callable[[], Any]
) -> None:
    service = dashboard(token="s3cret-token")
    job_id = service.submit().json()["id"]
    service.wait(job_id)
    page = pages()
    page.goto(service.url + "/")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", "wrong")
    page.click("#token-form button")
    page.wait_for_selector("#token-dialog[open] #token-error:not([hidden])")
    page.fill("#token-input", "s3cret-token")
    page.click("#token-form button")
    page.wait_for_selector(f"#jobs tr[data-job='{job_id}'] img[src^='blob:']")
    page.wait_for_selector("#live[data-state='live']")  # the stream took it as ?token=
    page.goto(service.url + f"/jobs/{job_id}")
    page.wait_for_selector("#figure svg.boxes g.detection")
    page.goto(service.url + "/stats")
    page.wait_for_selector("#chart-days rect.bar")
    assert page.locator("#token-dialog[open]").count() == 0


def test_stats_and_map_draw_charts_and_points(
    dashboard: Callable[..., RunningService], pages: Callable[[], Any], tmp_path: Path
) -> None:
    service = dashboard()
    # Three frames 1.1 km apart, and a fourth 11 m from the first: clustered with it.
    latitudes = (52.0, 52.01, 52.02, 52.0001)
    ids = [
        service.submit(geotagged(lat, 13.0), name=f"f{i}.jpg").json()["id"]
        for i, lat in enumerate(latitudes)
    ]
    for job_id in ids:
        assert service.wait(job_id)["status"] == "succeeded"
    page = pages()
    page.goto(service.url + "/stats")
    page.wait_for_selector("#chart-labels")
    assert page.locator("#chart-days rect.bar").count() >= 1
    assert page.locator("#chart-labels rect.bar").count() == 3  # person, vehicle, building
    assert "[object" not in page.inner_text("main")
    shot(page, tmp_path, "stats")
    page.goto(service.url + "/map")
    page.wait_for_selector("#map")
    links = page.locator("#map a.point")
    assert links.count() == 2
    assert {links.nth(i).get_attribute("href") for i in range(2)} == {
        f"/jobs/{i}" for i in ids[1:3]
    }
    assert page.text_content("#map .cluster text") == "2"
    # The cluster lists both its frames beside the map, and the map zooms in to them.
    page.click("#map .cluster")
    listed = page.locator("#map-panel #cluster-jobs a")
    listed.nth(1).wait_for()
    assert {listed.nth(i).get_attribute("href") for i in range(2)} == {
        f"/jobs/{ids[0]}",
        f"/jobs/{ids[3]}",
    }
    names = {listed.nth(i).inner_text() for i in range(2)}
    assert names == {f"#{ids[0]} f0.jpg", f"#{ids[3]} f3.jpg"}
    zoomed = page.locator("#map a.point")
    assert zoomed.count() == 2 and page.locator("#map .cluster").count() == 0
    assert {zoomed.nth(i).get_attribute("href") for i in range(2)} == {
        f"/jobs/{ids[0]}",
        f"/jobs/{ids[3]}",
    }
    page.click("#map-all")
    page.wait_for_selector("#map .cluster")
    assert page.locator("#map a.point").count() == 2
    page.click("#map .cluster")
    page.click(f"#cluster-jobs a[href='/jobs/{ids[3]}']")
    page.wait_for_url(f"**/jobs/{ids[3]}")
    page.wait_for_selector(".job[data-status='succeeded']")
    assert page.inner_text("main h1").startswith(f"Job #{ids[3]}")
    page.go_back()
    page.wait_for_selector("#map")
    assert page.locator("#map #north").count() == 1
    # ~2.2 km north to south over ~420 px: a 500 m bar
    assert page.text_content("#map #scale") == "500 m"
    shot(page, tmp_path, "map")
    for path in ("/inbox", "/submit"):
        page.goto(service.url + path)
        page.wait_for_selector("main h1")
        assert page.locator("main .error").count() == 0
        assert "[object" not in page.inner_text("main")


def test_the_inbox_page_lists_a_rejection_made_before_it_opened(
    dashboard: Callable[..., RunningService], pages: Callable[[], Any], tmp_path: Path
) -> None:
    service = dashboard(inbox=tmp_path / "inbox", inbox_settle_seconds=0.3)
    (tmp_path / "inbox" / "notes.txt").write_text("not a picture")
    deadline = time.monotonic() + WAIT_MS / 1000
    while service.client.get("/v1/inbox").json()["since_start"]["rejected"] < 1:
        assert time.monotonic() < deadline, "the inbox never rejected notes.txt"
        time.sleep(0.05)
    page = pages()
    page.goto(service.url + "/inbox")
    row = page.locator("#inbox-recent tr.filing-rejected")
    row.wait_for()
    assert row.count() == 1
    text = row.inner_text()
    assert "notes.txt" in text and "unsupported_type" in text and "not an image file" in text
    assert row.locator("td.error").count() == 1  # the reason is marked as a failure
    assert page.locator("#rejections li").count() == 0  # not from a live event: from the ledger


def test_pages_and_assets_keep_the_browser_guard_and_forbid_other_origins(
    settings: Settings, serve: Callable[..., RunningService]
) -> None:
    service = serve(settings)
    client = service.client
    for path in ("/", "/submit", "/models", "/inbox", "/stats", "/map", "/jobs/1"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
    asset = client.get("/static/pages/job.js")
    assert asset.status_code == 200 and "javascript" in asset.headers["content-type"]
    assert "script-src 'self'" in asset.headers["content-security-policy"]
    assert "http" not in client.get("/").text.replace('href="/', "")  # nothing from elsewhere
    for path in ("/", "/static/app.js"):
        rebound = client.get(path, headers={"Host": "attacker.example"})
        assert rebound.status_code == 403 and rebound.json()["code"] == "host_not_allowed"
        embedded = client.get(
            path, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
        )
        assert embedded.status_code == 403 and embedded.json()["code"] == "origin_not_allowed"
    # A job page for any segment is the shell: the page says what is wrong with it.
    for path in ("/jobs/0", "/jobs/abc"):
        shell = client.get(path)
        assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in shell.headers["content-security-policy"]


def test_an_unknown_path_is_a_404_page_for_a_browser_and_json_for_a_program(
    settings: Settings, serve: Callable[..., RunningService]
) -> None:
    client = serve(settings).client
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    page = client.get("/no/such/page", headers=browser)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/static/app.js">' in page.text
    program = client.get("/no/such/page", headers={"Accept": "application/json"})
    assert program.status_code == 404 and program.headers["content-type"] == "application/json"
    assert program.json()["code"] == "not_found" and program.json()["message"]
    # Under the API, the docs and the assets a miss is a JSON 404 even for a browser.
    for path in ("/v1/no-such-thing", "/static/no-such.js", "/docs/no-such", "/metrics/x"):
        miss = client.get(path, headers=browser)
        assert miss.status_code == 404 and miss.json()["code"] == "not_found", path
    assert client.post("/no/such/page", headers=browser).json()["code"] == "not_found"
    rebound = client.get("/no/such/page", headers={**browser, "Host": "attacker.example"})
    assert rebound.status_code == 403 and rebound.json()["code"] == "host_not_allowed"


def test_a_bad_or_missing_job_page_says_so_and_stops_asking(
    dashboard: Callable[..., RunningService], pages: Callable[[], Any]
) -> None:
    service = dashboard()
    page = pages()
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url.removeprefix(service.url)))
    page.goto(service.url + "/jobs/abc")
    page.wait_for_selector("#missing")
    assert page.inner_text("#missing h1") == "Not a job id"
    assert not [url for url in asked if url.startswith("/v1/")]  # nothing to ask the API

    answer = page.goto(service.url + "/jobs/999")
    assert answer is not None and answer.status == 200
    page.wait_for_selector("#missing")
    assert page.inner_text("#missing h1") == "No such job"
    assert "#999" in page.inner_text("#missing") and "{" not in page.inner_text("main")
    # Longer than one polling interval: a page still polling would have asked again.
    page.wait_for_timeout(2_500)
    assert [url for url in asked if url.startswith("/v1/jobs/999")] == ["/v1/jobs/999"]
    assert not [url for url in asked if url.startswith("/v1/events")]  # no subscription

    answer = page.goto(service.url + "/no/such/page")
    assert answer is not None and answer.status == 404
    page.wait_for_selector("#not-found")
    assert "/no/such/page" in page.inner_text("#not-found")
    assert page.locator("#not-found a[href='/']").count() == 1


def test_a_redacting_jobs_image_appears_once_its_redacted_copy_exists(
    dashboard: Callable[..., RunningService],
    pages: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = dashboard()
    gate = gate_detector(service, monkeypatch)
    job_id = service.submit(queries="car", redact="person").json()["id"]
    assert gate.inside.wait(timeout=60)
    page = pages()
    page.goto(f"{service.url}/jobs/{job_id}")
    page.wait_for_selector(".job[data-status='running']")
    # The original is never asked for: only the redacted copy, once the job has succeeded.
    assert page.get_attribute("#frame", "src") is None
    gate.release.set()
    page.wait_for_selector(".job[data-status='succeeded']")
    until(page, "document.getElementById('frame').src.startsWith('blob:')")
    assert page.locator("#downloads button", has_text="Redacted image").count() == 1
    assert page.locator("#downloads button", has_text="Original").count() == 0
