"""Read models on a real SQLite file: pages of views read in one hop each, and exports that
stream them page by page (several pages here) with the same content as one page holds."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any

from service.detection import Detection, encode_mask
from service.exports import WRITERS
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

    # A single job is its page view plus its attempts, read in the same snapshot.
    for job in whole:
        single = dict(singles[job["id"]])
        attempts = single.pop("attempt_history")
        assert single == job
        assert len(attempts) == job["attempts"]
