"""Read models on a real SQLite file: pages of views read in one hop each, and exports that
stream them page by page (several pages here) with the same content as one page holds, and
the same bytes from the projections they read as from full views."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any

from service.detection import Detection, encode_mask
from service.errors import JobFailure
from service.exports import PROJECTIONS, WRITERS
from service.store.history import JobFilter
from service.store.migrate import migrate
from service.store.queue import ImageRecord, Outcome, Queue
from service.store.reads import Reads
from service.store.sqlite import read_engine

JOBS = 7


async def _history(db: Path) -> None:
    """JOBS jobs: even ones succeeded with 0-2 detections (one with a mask), a geotagged
    image every third job, odd ones still queued."""
    import numpy as np

    queue = await Queue.open(db)
    try:
        for i in range(JOBS):
            exif = {"gps": {"latitude": 47.0 + i, "longitude": 8.5}} if i % 3 == 0 else None
            image = ImageRecord(f"{i:064x}", 10, 100, 50, "JPEG", f"images/{i}.jpg", exif)
            await queue.enqueue(image, {"queries": ["car"], "options": {}}, input_name=f"{i}.jpg")
        for _ in range(0, JOBS, 2):
            claim = await queue.claim("w", 60)
            assert claim is not None
            mask = encode_mask(np.eye(4, dtype=bool))
            found = [
                Detection("car", (1.234, 2.0, 30.5, 40.0), (100, 50), mask if k else None)
                for k in range(claim.job_id % 3)
            ]
            assert await queue.complete(claim, Outcome(detections=found, reasoning="ok"))
            await queue.claim("w", 60)  # the next (odd) job: running, then left queued again
            await queue.recover(expired_only=False)
    finally:
        await queue.close()


def test_exports_over_several_pages_match_one_page_of_views(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"
    migrate(db)
    asyncio.run(_history(db))

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, str], dict[int, dict[str, Any]]]:
        reads = Reads(read_engine(db))
        try:
            whole = (await reads.page(JobFilter(), limit=JOBS))["jobs"]
            outputs: dict[str, str] = {}
            for fmt, write in WRITERS.items():
                pages = await reads.stream(JobFilter(), batch=2)  # 4 pages, the last of one job
                outputs[fmt] = "".join([chunk async for chunk in write(pages)])
            singles = {job["id"]: await reads.job(job["id"]) for job in whole}
        finally:
            await reads.close()
        return whole, outputs, singles

    whole, outputs, singles = asyncio.run(scenario())
    assert len(whole) == JOBS
    ids = [job["id"] for job in whole]
    assert ids == sorted(ids, reverse=True)
    assert [json.loads(line) for line in outputs["jsonl"].splitlines()] == whole
    detections = [d for job in whole for d in (job["result"] or {}).get("detections", [])]
    assert detections and any("mask" in d for d in detections)

    rows = list(csv.DictReader(io.StringIO(outputs["csv"])))
    assert [int(r["job_id"]) for r in rows] == [
        job["id"]
        for job in whole
        for _ in range(max(1, len((job["result"] or {}).get("detections", []))))
    ]
    features = json.loads(outputs["geojson"])["features"]
    assert [f["properties"]["job_id"] for f in features] == [
        job["id"] for job in whole if job["input"]["exif"]
    ]
    coco = json.loads(outputs["coco"])
    assert [image["id"] for image in coco["images"]] == [j["id"] for j in whole if j["result"]]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(detections) + 1))

    # A single job is its page view plus its attempts and webhook deliveries (none here: no
    # job names a URL), read in the same snapshot.
    for job in whole:
        single = dict(singles[job["id"]])
        attempts = single.pop("attempt_history")
        assert single.pop("webhooks") == []
        assert single == job
        assert len(attempts) == job["attempts"]


VARIED = 12


async def _varied_history(db: Path) -> None:
    """Every kind of job an export meets: succeeded with 0-3 detections at odd coordinates
    (masks on some), failed with a reason, queued; EXIF with GPS (with and without altitude),
    with no GPS, none at all, and one as an older version stored it (NaN in it); a capture
    time, a source path, and an image retention removed."""
    import sqlite3

    import numpy as np

    queue = await Queue.open(db)
    try:
        for i in range(VARIED):
            exif: dict[str, Any] | None = [
                {"gps": {"latitude": 47.123456 + i, "longitude": -8.5, "altitude": 410.5}},
                {"gps": {"latitude": -33.9, "longitude": 151.2}, "make": "Ünïcode"},
                {"captured_at": "2026:05:04 03:02:01", "model": "X"},
                None,
            ][i % 4]
            image = ImageRecord(f"{i:064x}", 10 + i, 640 + i, 480 - i, "JPEG", f"i/{i}.jpg", exif)
            await queue.enqueue(
                image,
                {"queries": ["car", "roof"], "options": {}},
                input_name=f'ñ {i}, "x".jpg',
                source="path" if i % 2 else "api",
                source_path=f"flights/a,b/{i}.jpg" if i % 2 else None,
            )
        for n in range(VARIED - 2):
            claim = await queue.claim("w", 60)
            assert claim is not None
            if n % 5 == 4:
                failure = JobFailure("model_error", 'it broke, "badly"', transient=False)
                assert await queue.fail(claim, failure, retry_in=None) == "failed"
                continue
            mask = encode_mask(np.eye(6, dtype=bool)[:, ::-1])
            found = [
                Detection(
                    ["car", "roof", "car"][k],
                    (1.23456 + k, 2.005 * k, 30.555 + k / 3, 40.0049),
                    (640, 480),
                    mask if k == 1 else None,
                )
                for k in range(n % 4)
            ]
            timings = {"detect": 12.345, "total": 99.99}
            outcome = Outcome(found, 'wet roofs, "a"\n', timings, {"detector": {"name": "m"}})
            assert await queue.complete(claim, outcome)
    finally:
        await queue.close()
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE images SET pruned_at = 1.0 WHERE sha256 = ?", (f"{1:064x}",))
        raw.execute(
            "UPDATE images SET exif = ? WHERE sha256 = ?",
            ('{"gps": {"latitude": 1.5, "longitude": 2.5, "altitude": NaN}}', f"{5:064x}"),
        )


def test_each_export_from_its_projection_is_the_export_from_full_views(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"
    migrate(db)
    asyncio.run(_varied_history(db))

    async def both() -> dict[str, tuple[str, str]]:
        reads = Reads(read_engine(db))
        try:
            outputs = {}
            for fmt, write in WRITERS.items():
                full = await reads.stream(JobFilter(), batch=5)
                projected = await reads.stream(JobFilter(), batch=5, project=PROJECTIONS[fmt])
                outputs[fmt] = (
                    "".join([chunk async for chunk in write(projected)]),
                    "".join([chunk async for chunk in write(full)]),
                )
        finally:
            await reads.close()
        return outputs

    outputs = asyncio.run(both())
    for fmt, (projected, full) in outputs.items():
        assert projected == full, fmt
    # The history holds what the comparison is about.
    jobs = [json.loads(line) for line in outputs["jsonl"][1].splitlines()]
    assert {job["status"] for job in jobs} == {"succeeded", "failed", "queued"}
    assert any(not job["input"]["stored"] for job in jobs)
    detections = [d for job in jobs for d in (job["result"] or {}).get("detections", [])]
    assert any("mask" in d for d in detections)
    features = json.loads(outputs["geojson"][1])["features"]
    assert [f["properties"]["job_id"] for f in features] == [
        job["id"] for job in jobs if (job["input"]["exif"] or {}).get("gps")
    ]
    assert any(len(f["geometry"]["coordinates"]) == 2 for f in features)
    assert len(json.loads(outputs["coco"][1])["annotations"]) == len(detections)
