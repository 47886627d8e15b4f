"""Results history over a real database: filters, pagination, statistics, exports read back by
their reference readers, EXIF GPS to GeoJSON, the annotated image, and retention."""

from __future__ import annotations

import csv
import io
import json
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geojson
import pytest
from PIL import Image, ImageChops
from pycocotools.coco import COCO

from service.config import Settings
from service.store.postgres.connection import PgConnection
from tests.conftest import RunningService, make_image, make_settings

Serve = Callable[..., RunningService]
DAY = 86400.0
NOW = time.time()


@dataclass
class Seed:
    id: int
    status: str
    source: str
    created_at: float
    source_path: str | None
    captured_at: str | None
    labels: list[str] = field(default_factory=list)
    reasoning: str = ""
    prompt: str = "Describe."


WORDS = ["flooding", "tractor", "erosion", "roof damage", "clear skies", "debris"]


def open_db(settings: Settings) -> Any:
    """The service's database, outside the service, in autocommit: its SQLite file, or its
    PostgreSQL database (which takes the same SQL, `?` placeholders included)."""
    if settings.database_url is not None:
        return PgConnection(settings.database_url)
    return sqlite3.connect(settings.database, isolation_level=None)


def seed(settings: Settings, n: int, rand: random.Random, start_id: int = 10_000) -> list[Seed]:
    """Rows written straight into the database, the way the queue writes them."""
    db = open_db(settings)
    db.execute("BEGIN")
    seeds = []
    for k in range(n):
        job_id = start_id + k
        sha = f"{job_id:064x}"
        status = rand.choice(["succeeded"] * 4 + ["failed", "queued", "cancelled"])
        source = rand.choice(["api", "inbox", "path"])
        folder = rand.choice(["flights/tue", "flights/wed", "site-a"])
        s = Seed(
            id=job_id,
            status=status,
            source=source,
            created_at=NOW - rand.uniform(0, 10 * DAY),
            source_path=f"{folder}/IMG_{k}.jpg" if source == "inbox" else None,
            captured_at=f"2026-11-{rand.randint(10, 20):02d}T{rand.randint(0, 23):02d}:00:00"
            if rand.random() < 0.7
            else None,
            prompt=rand.choice(["Describe.", "Any flooding here?", "Count the vehicles."]),
        )
        if status == "succeeded":
            s.labels = [rand.choice(["car", "truck", "person"]) for _ in range(rand.randint(0, 5))]
            s.reasoning = " and ".join(rand.sample(WORDS, 2))
        db.execute(
            "INSERT INTO images (sha256, bytes, width, height, format, path, created_at,"
            " captured_at) VALUES (?, 100, 200, 100, 'JPEG', ?, ?, ?)",
            (sha, f"images/{sha[:2]}/{sha}.jpg", s.created_at, s.captured_at),
        )
        finished = s.created_at + 5 if status in ("succeeded", "failed", "cancelled") else None
        db.execute(
            "INSERT INTO jobs (id, status, source, source_path, image_sha256, input_name, params,"
            " run_after, created_at, finished_at, attempts, timings)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
            (
                job_id,
                status,
                source,
                s.source_path,
                sha,
                f"IMG_{k}.jpg",
                json.dumps({"queries": ["car"], "prompt": s.prompt, "options": {}}),
                # Seeded queued work is scheduled far ahead: the worker must not run it.
                s.created_at + (30 * DAY if status == "queued" else 0),
                s.created_at,
                finished,
                json.dumps({"detect": 100.0, "reason": 50.0}) if status == "succeeded" else None,
            ),
        )
        if status == "succeeded":
            db.execute(
                "INSERT INTO results (job_id, reasoning, created_at) VALUES (?, ?, ?)",
                (job_id, s.reasoning, finished),
            )
            db.executemany(
                "INSERT INTO detections (job_id, idx, label, x1, y1, x2, y2) VALUES"
                " (?, ?, ?, 10, 10, 50, 40)",
                [(job_id, i + 1, label) for i, label in enumerate(s.labels)],
            )
        seeds.append(s)
    db.execute("COMMIT")
    db.close()
    return seeds


def all_ids(service: RunningService, **params: Any) -> list[int]:
    ids, cursor = [], None
    while True:
        query = {**params, "limit": 37, **({"cursor": cursor} if cursor else {})}
        response = service.client.get("/v1/jobs", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        ids += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


@pytest.fixture
def seeded(
    tmp_path: Path, serve: Serve, database_url: str | None
) -> tuple[RunningService, list[Seed]]:
    settings = make_settings(tmp_path, database_url=database_url)
    service = serve(settings)
    return service, seed(settings, 300, random.Random(7))


def test_each_filter_returns_exactly_the_expected_jobs(
    seeded: tuple[RunningService, list[Seed]],
) -> None:
    service, seeds = seeded
    cutoff = NOW - 4 * DAY

    def expect(keep: Callable[[Seed], bool]) -> list[int]:
        chosen = [s for s in seeds if keep(s)]
        return [s.id for s in sorted(chosen, key=lambda s: (s.created_at, s.id), reverse=True)]

    cases: list[tuple[dict[str, Any], Callable[[Seed], bool]]] = [
        ({}, lambda s: True),
        ({"status": "failed"}, lambda s: s.status == "failed"),
        ({"source": "inbox"}, lambda s: s.source == "inbox"),
        ({"created_after": str(cutoff)}, lambda s: s.created_at >= cutoff),
        (
            {"created_before": str(cutoff), "status": "succeeded"},
            lambda s: s.created_at < cutoff and s.status == "succeeded",
        ),
        ({"folder": "flights/tue"}, lambda s: (s.source_path or "").startswith("flights/tue/")),
        ({"folder": "flights"}, lambda s: (s.source_path or "").startswith("flights/")),
        ({"label": "truck"}, lambda s: "truck" in s.labels),
        ({"label": "car", "min_count": 3}, lambda s: s.labels.count("car") >= 3),
        ({"q": "flooding"}, lambda s: "flooding" in s.reasoning or "flooding" in s.prompt),
        ({"q": "roof damage"}, lambda s: "roof" in s.reasoning and "damage" in s.reasoning),
        (
            {"captured_after": "2026-11-15", "captured_before": "2026-11-17"},
            lambda s: s.captured_at is not None and "2026-11-15" <= s.captured_at < "2026-11-17",
        ),
    ]
    for params, keep in cases:
        expected = expect(keep)
        assert expected, f"the seed should exercise {params}"
        assert all_ids(service, **params) == expected, params


def test_bad_filters_are_422(seeded: tuple[RunningService, list[Seed]]) -> None:
    service, _ = seeded
    for params in (
        {"created_after": "last tuesday"},
        {"min_count": "2"},
        {"sort": "size"},
        {"cursor": "nonsense"},
        {"q": "   "},
        {"source": "foo"},
        {"source": "\x00"},
        {"status": "\x00"},
        {"stauts": "failed"},  # misspelt: refused, not ignored (which would list every job)
    ):
        response = service.client.get("/v1/jobs", params=params)
        assert response.status_code == 422, params
        assert response.json()["code"] in ("invalid_filter", "invalid_cursor")
    # Every enumerated filter names its allowed values, on every route that takes it.
    for path in ("/v1/jobs", "/v1/stats", *(f"/v1/exports/jobs.{f}" for f in EXPORTS)):
        for params, allowed in (
            ({"source": "foo"}, "api, path, inbox"),
            ({"status": "x"}, "queued, running"),
        ):
            response = service.client.get(path, params=params)
            assert response.status_code == 422, (path, params, response.text)
            assert response.json()["code"] == "invalid_filter" and allowed in response.text


def test_exports_sort_like_the_list_and_refuse_paging(
    seeded: tuple[RunningService, list[Seed]],
) -> None:
    service, _ = seeded
    for sort in ("created", "finished"):
        listed = all_ids(service, sort=sort)
        export = service.client.get("/v1/exports/jobs.jsonl", params={"sort": sort})
        assert export.status_code == 200, export.text
        assert [json.loads(line)["id"] for line in export.text.splitlines()] == listed, sort
    # Exports and statistics answer every matching job: a page's parameters are refused, as
    # a bad sort is, before a byte of the body goes out.
    for path in ("/v1/stats", *(f"/v1/exports/jobs.{f}" for f in EXPORTS)):
        for params in ({"sort": "\x00"}, {"cursor": "\x00"}, {"limit": "5"}, {"x": "1"}):
            if path != "/v1/stats" and "sort" in params:
                expected = "sort must be one of created, finished"
            else:
                expected = "does not take the query parameter"
            response = service.client.get(path, params=params)
            assert response.status_code == 422, (path, params, response.text)
            assert response.json()["code"] == "invalid_filter", response.text
            assert expected in response.json()["message"], response.text


def test_pagination_neither_skips_nor_repeats_while_jobs_arrive_and_finish(
    seeded: tuple[RunningService, list[Seed]],
) -> None:
    service, seeds = seeded
    for sort in ("created", "finished"):
        expected = {s.id for s in seeds if sort == "created" or s.status not in ("queued",)}
        seen: list[int] = []
        cursor = None
        extra = 20_000 if sort == "created" else 30_000
        while True:
            query = {"sort": sort, "limit": 25, **({"cursor": cursor} if cursor else {})}
            page = service.client.get("/v1/jobs", params=query).json()
            seen += [j["id"] for j in page["jobs"]]
            # New work lands between pages: newer created and newer finished times.
            seed(service.settings, 3, random.Random(len(seen)), start_id=extra)
            extra += 3
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)), f"{sort}: a job was repeated"
        assert set(seen) >= expected, f"{sort}: a job was skipped"


def test_stats_follow_the_filters(seeded: tuple[RunningService, list[Seed]]) -> None:
    service, seeds = seeded
    body = service.client.get("/v1/stats", params={"source": "inbox"}).json()
    inbox = [s for s in seeds if s.source == "inbox"]
    assert body["jobs"] == len(inbox)
    assert body["by_status"] == {
        st: sum(1 for s in inbox if s.status == st) for st in {s.status for s in inbox}
    }
    trucks = sum(s.labels.count("truck") for s in inbox)
    assert body["detections_per_label"]["truck"]["detections"] == trucks
    assert sum(d["jobs"] for d in body["per_day"]) == len(inbox)
    assert body["mean_timings_ms"]["detect"] == 100.0


def _gps_jpeg() -> bytes:
    image = Image.new("RGB", (320, 240), (30, 90, 40))
    exif = Image.Exif()
    exif[0x0132] = "2026:11:17 09:30:00"
    gps = {1: "N", 2: (47.0, 22.0, 30.0), 3: "E", 4: (8.0, 32.0, 24.0), 5: 0, 6: 432.1}
    exif[0x8825] = gps
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def test_exports_read_back_by_reference_readers(
    serve: Serve, tmp_path: Path, database_url: str | None
) -> None:
    service = serve(make_settings(tmp_path, database_url=database_url))
    geo = service.wait(service.submit(_gps_jpeg(), queries="car, roof").json()["id"])
    plain = service.wait(service.submit(make_image(64, 48), queries="person").json()["id"])
    assert geo["status"] == plain["status"] == "succeeded"
    assert geo["input"]["captured_at"] == "2026-11-17T09:30:00"
    jobs = {j["id"]: j for j in (geo, plain)}
    detections = sum(len(j["result"]["detections"]) for j in jobs.values())
    assert detections >= 2, "the tiny detector emits one box per query"

    rows = list(csv.DictReader(io.StringIO(service.client.get("/v1/exports/jobs.csv").text)))
    assert len(rows) == sum(max(1, len(j["result"]["detections"])) for j in jobs.values())
    geo_rows = [r for r in rows if int(r["job_id"]) == geo["id"]]
    first = geo["result"]["detections"][0]
    assert geo_rows[0]["label"] == first["label"]
    assert [float(geo_rows[0][k]) for k in ("x1", "y1", "x2", "y2")] == first["box"]

    lines = service.client.get("/v1/exports/jobs.jsonl").text.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [plain["id"], geo["id"]]
    assert json.loads(lines[1])["result"] == geo["result"]

    collection = geojson.loads(service.client.get("/v1/exports/jobs.geojson").text)
    assert collection.is_valid, collection.errors()
    (point,) = collection["features"]  # only the geotagged job
    lon, lat, alt = point["geometry"]["coordinates"]
    assert (lat, lon, alt) == pytest.approx((47.375, 8.54, 432.1))
    assert point["properties"]["job_id"] == geo["id"]
    assert sum(point["properties"]["counts"].values()) == len(geo["result"]["detections"])

    coco_path = tmp_path / "coco.json"
    coco_path.write_bytes(service.client.get("/v1/exports/jobs.coco").content)
    coco = COCO(str(coco_path))
    assert sorted(coco.getImgIds()) == sorted(jobs)
    assert len(coco.getAnnIds()) == detections
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[geo["id"]]))[0]
    x1, y1, x2, y2 = geo["result"]["detections"][0]["box"]
    assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert coco.loadCats(ann["category_id"])[0]["name"] == geo["result"]["detections"][0]["label"]
    filtered = service.client.get("/v1/exports/jobs.jsonl", params={"label": "person"}).text
    assert [json.loads(line)["id"] for line in filtered.splitlines()] == [plain["id"]]
    assert service.client.get("/v1/exports/jobs.xml").status_code == 404


def test_annotated_image_draws_the_boxes(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    job = service.wait(service.submit(make_image(640, 480), queries="car").json()["id"])
    response = service.client.get(f"/v1/jobs/{job['id']}/annotated")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    drawn = Image.open(io.BytesIO(response.content)).convert("RGB")
    original = Image.open(
        io.BytesIO(service.client.get(f"/v1/jobs/{job['id']}/image").content)
    ).convert("RGB")
    assert drawn.size == original.size
    x1, y1, x2, _ = (round(v) for v in job["result"]["detections"][0]["box"])
    edge = ImageChops.difference(drawn, original).crop((x1, y1, x2 + 1, y1 + 2))
    assert max(band[1] for band in edge.getextrema()) > 60, "the box edge is drawn"


def test_prune_removes_what_it_says_and_nothing_else(
    tmp_path: Path, serve: Serve, database_url: str | None
) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    service = serve(settings)
    old = service.wait(service.submit(make_image(50, 50)).json()["id"])
    shared_old = service.wait(service.submit(make_image(51, 51)).json()["id"])
    shared_new = service.wait(service.submit(make_image(51, 51), queries="x").json()["id"])
    db = open_db(settings)
    long_ago = NOW - 40 * DAY
    db.execute(
        "UPDATE jobs SET created_at = ?, finished_at = ? WHERE id IN (?, ?)",
        (long_ago, long_ago, old["id"], shared_old["id"]),
    )
    queued_old = seed(settings, 40, random.Random(3), start_id=50_000)
    pending = [s.id for s in queued_old if s.status == "queued"]
    db.execute(
        f"UPDATE jobs SET created_at = ? WHERE id IN ({','.join(map(str, pending))})", (long_ago,)
    )
    before = {r[0] for r in db.execute("SELECT id FROM jobs")}
    old_file = settings.data_dir / "images" / old["input"]["sha256"][:2]

    dry = service.client.post("/v1/prune", json={"older_than": "30d", "dry_run": True}).json()
    assert dry == {
        "dry_run": True,
        "jobs_removed": 2,
        "images_removed": 1,
        "bytes_freed": old["input"]["bytes"],
    }
    assert {r[0] for r in db.execute("SELECT id FROM jobs")} == before

    kept = service.client.post("/v1/prune", json={"older_than": "30d", "keep_results": True})
    assert kept.json()["images_removed"] == 1 and kept.json()["jobs_removed"] == 0
    assert service.client.get(f"/v1/jobs/{old['id']}/image").status_code == 410
    assert service.client.get(f"/v1/jobs/{old['id']}").json()["result"] == old["result"]
    assert not any(old_file.glob(f"{old['input']['sha256']}*"))

    done = service.client.post("/v1/prune", json={"older_than": "30d"}).json()
    assert done["jobs_removed"] == 2 and done["images_removed"] == 0
    after = {r[0] for r in db.execute("SELECT id FROM jobs")}
    assert after == before - {old["id"], shared_old["id"]}
    assert set(pending) <= after  # queued work is never touched
    assert service.client.get(f"/v1/jobs/{shared_new['id']}/image").status_code == 200
    gone = db.execute("SELECT count(*) FROM results WHERE job_id = ?", (old["id"],)).fetchone()
    assert gone[0] == 0
    search = "job_search WHERE job_id" if settings.database_url else "jobs_fts WHERE rowid"
    assert db.execute(f"SELECT count(*) FROM {search} = ?", (old["id"],)).fetchone()[0] == 0
    assert service.client.post("/v1/prune", json={"older_than": "soon"}).status_code == 422


def test_a_retention_policy_is_applied_by_the_service(
    tmp_path: Path, serve: Serve, database_url: str | None
) -> None:
    from service.store.migrate import migrate

    settings = make_settings(tmp_path, retention="30d", database_url=database_url)
    if database_url is None:
        migrate(settings.database)  # the PostgreSQL database comes migrated
    seeds = seed(settings, 30, random.Random(11))
    db = open_db(settings)
    finished = [s.id for s in seeds if s.status != "queued"]
    db.execute(
        f"UPDATE jobs SET finished_at = ? WHERE id IN ({','.join(map(str, finished))})",
        (NOW - 31 * DAY,),
    )
    service = serve(settings)

    def remaining() -> set[int]:
        return {row[0] for row in db.execute("SELECT id FROM jobs")}

    deadline = time.monotonic() + 30
    while remaining() & set(finished) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remaining() == {s.id for s in seeds if s.status == "queued"}
    assert service.client.get("/v1/health").status_code == 200


def test_out_of_range_inputs_are_4xx_never_500(seeded: tuple[RunningService, list[Seed]]) -> None:
    service, _ = seeded
    import base64

    huge_cursor = base64.urlsafe_b64encode(b'["created", 1e400, 5]').decode().rstrip("=")
    for path, params in (
        ("/v1/jobs", {"label": "car", "min_count": "99999999999999999999999"}),
        ("/v1/stats", {"label": "car", "min_count": "99999999999999999999999"}),
        ("/v1/exports/jobs.csv", {"label": "car", "min_count": "99999999999999999999999"}),
        ("/v1/jobs", {"cursor": huge_cursor}),
        ("/v1/jobs", {"created_after": "tomorrow-ish"}),
        ("/v1/jobs", {"created_after": "nan"}),
        ("/v1/stats", {"created_before": "-inf"}),
        ("/v1/jobs", {"created_after": "1e400"}),
        ("/v1/jobs", {"label": "x" * 1001}),
        ("/v1/jobs", {"limit": str(2**63)}),
        ("/v1/jobs", {"limit": "-1"}),
        ("/v1/jobs", {"cursor": "\x00" * 5}),
        ("/v1/jobs", {"sort": "\x00"}),
        ("/v1/jobs", {"source": "\x00"}),
        ("/v1/exports/jobs.csv", {"sort": "\x00"}),
        ("/v1/exports/jobs.geojson", {"cursor": "\x00"}),
        ("/v1/stats", {"min_count": str(2**64), "label": "car"}),
    ):
        response = service.client.get(path, params=params)
        assert response.status_code == 422, (path, params, response.text)
        assert response.json()["code"] in ("invalid_filter", "invalid_cursor", "invalid_request")
    assert service.client.get("/v1/jobs", params={"folder": "/"}).json()["jobs"]
    response = service.client.post("/v1/prune", json={"older_than": "-5d"})
    assert response.status_code == 422


def test_the_same_bytes_after_pruning_are_stored_again(
    tmp_path: Path, serve: Serve, database_url: str | None
) -> None:
    service = serve(make_settings(tmp_path, database_url=database_url))
    image = make_image(70, 70)
    first = service.wait(service.submit(image).json()["id"])
    db = open_db(service.settings)
    db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (NOW - 40 * DAY, first["id"]))
    pruned = service.client.post("/v1/prune", json={"older_than": "30d", "keep_results": True})
    assert pruned.json()["images_removed"] == 1
    assert service.client.get(f"/v1/jobs/{first['id']}/image").status_code == 410
    again = service.wait(service.submit(image).json()["id"])
    assert again["status"] == "succeeded" and again["input"]["stored"] is True
    assert service.client.get(f"/v1/jobs/{again['id']}/image").status_code == 200
    assert service.client.get(f"/v1/jobs/{again['id']}/annotated").status_code == 200


EXPORTS = ("csv", "jsonl", "geojson", "coco")


def _parse_export(fmt: str, text: str) -> int:
    """How many jobs or rows a complete export holds; raises on a body cut short."""
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0][0] == "job_id"
        return len(rows) - 1
    if fmt == "jsonl":
        return len([json.loads(line) for line in text.splitlines()])
    document = json.loads(text)
    return len(document["features" if fmt == "geojson" else "images"])


def test_control_characters_in_q_are_4xx_or_answered_never_500(
    seeded: tuple[RunningService, list[Seed]],
) -> None:
    service, seeds = seeded
    for q in ("\x00", "\x00\x01\x1f", " \x7f ", "x" * 1001):
        for path in ("/v1/jobs", "/v1/stats", *(f"/v1/exports/jobs.{f}" for f in EXPORTS)):
            response = service.client.get(path, params={"q": q})
            assert response.status_code == 422, (path, q, response.text)
            assert response.json()["code"] == "invalid_filter", response.text
            assert "SELECT" not in response.text
    # Control characters separate words: the same answer as a space.
    text = {s.id: f"{s.prompt} {s.reasoning}" for s in seeds}
    both = {i for i, words in text.items() if "flooding" in words and "tractor" in words}
    assert both, "the seed has jobs with both words"
    for q in ("flooding\x00tractor", "flooding\ttractor", "flooding tractor"):
        assert set(all_ids(service, q=q)) == both, q
        stats = service.client.get("/v1/stats", params={"q": q})
        assert stats.status_code == 200 and stats.json()["jobs"] == len(both)
        for fmt in ("csv", "jsonl"):
            export = service.client.get(f"/v1/exports/jobs.{fmt}", params={"q": q})
            assert export.status_code == 200, export.text
            ids = (
                {int(r["job_id"]) for r in csv.DictReader(io.StringIO(export.text))}
                if (fmt == "csv")
                else {json.loads(line)["id"] for line in export.text.splitlines()}
            )
            assert ids == both, (fmt, q)


def test_exports_decide_their_status_before_the_first_byte(
    seeded: tuple[RunningService, list[Seed]], monkeypatch: pytest.MonkeyPatch
) -> None:
    service, _ = seeded
    for fmt in EXPORTS:
        # Nothing matches: a complete, empty document (jsonl: an empty body), not an error.
        empty = service.client.get(f"/v1/exports/jobs.{fmt}", params={"q": "zzzunmatched"})
        assert empty.status_code == 200, (fmt, empty.text)
        assert _parse_export(fmt, empty.text) == 0
        for params in ({"created_after": "nan"}, {"created_before": "inf"}, {"q": "\x00"}):
            refused = service.client.get(f"/v1/exports/jobs.{fmt}", params=params)
            assert refused.status_code == 422, (fmt, params, refused.text)
            assert refused.json()["code"] == "invalid_filter"

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error in SELECT jobs.id FROM jobs")

    # A query the database refuses is an error response, not a 200 cut short.
    monkeypatch.setattr(service.services.reads, "page", failing)
    for fmt in EXPORTS:
        response = service.client.get(f"/v1/exports/jobs.{fmt}")
        assert response.status_code == 500 and response.json()["code"] == "internal_error"
        assert "SELECT" not in response.text
