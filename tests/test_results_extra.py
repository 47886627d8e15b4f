"""What a result holds beyond its text, through the real store and HTTP app: a structured
answer, citations, planned queries, the tile report and a redacted copy's path; jobs stored
before them still read; CSV has a column per answer field, JSON Lines the whole answer, and
the full-text search finds the answer's words."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.api.schemas import Job, JobPage
from service.config import Settings
from service.detection import Detection
from service.params import JobParams
from service.store.history import JobFilter
from service.store.migrate import migrate
from service.store.queue import ImageRecord, Outcome, Queue
from service.store.reads import Reads
from service.store.sqlite import read_engine
from tests.conftest import RunningService, db_rows

Serve = Callable[..., RunningService]

SCHEMA = {
    "type": "object",
    "properties": {
        "damage": {"type": "string"},
        "count": {"type": "integer"},
        "severe": {"type": "boolean"},
        "areas": {"type": "array", "items": {"type": "string"}},
    },
}
# Words that appear nowhere but in the answer: the search must find the job by them.
ANSWER = {"damage": "collapsed chimney", "count": 3, "severe": True, "areas": ["north", "east"]}
OTHER = {"count": 1, "note": None}
TILING = {
    "size": 992,
    "overlap": 124,
    "full_frame": True,
    "grid": [[0, 0, 992, 992], [868, 0, 1860, 992]],
    "tile_ms": [12.5, 11.0],
    "full_frame_ms": 9.25,
    "merge_ms": 0.5,
}
STRUCTURED = JobParams(
    (),
    "Assess the roof.",
    tiling={"size": 992, "overlap": 124, "full_frame": True},
    set_of_marks=True,
    response_schema=SCHEMA,
    redact=("person",),
    keep_original=False,
    profile="storm-damage",
    plan=True,
)


def _image(n: int) -> ImageRecord:
    return ImageRecord(f"{n:064x}", 10, 2000, 1000, "JPEG", f"images/{n}.jpg")


def _old_job(db: Path) -> None:
    """A job and its result as the schema before aerial results stored them."""
    migrate(db, upto=6)
    conn = sqlite3.connect(db)
    conn.execute(
        "INSERT INTO images (sha256, bytes, width, height, format, path, created_at)"
        " VALUES (?, 10, 2000, 1000, 'JPEG', 'images/old.jpg', ?)",
        ("0" * 64, time.time()),
    )
    conn.execute(
        "INSERT INTO jobs (status, image_sha256, input_name, params, run_after, created_at,"
        " finished_at, attempts) VALUES ('succeeded', ?, 'old.jpg', ?, ?, ?, ?, 1)",
        ("0" * 64, json.dumps({"queries": ["car"], "prompt": "p", "options": {}}), 1.0, 1.0, 2.0),
    )
    conn.execute("INSERT INTO results (job_id, reasoning, created_at) VALUES (1, 'old text', 2.0)")
    conn.commit()
    conn.close()
    migrate(db)


async def _finish(queue: Queue, n: int, params: dict[str, Any], outcome: Outcome) -> int:
    job_id, _ = await queue.enqueue(_image(n), params, input_name=f"{n}.jpg")
    claim = await queue.claim("w", 60)
    assert claim is not None and claim.job_id == job_id
    assert await queue.complete(claim, outcome)
    return job_id


async def _history(db: Path) -> tuple[int, int, int]:
    """The old job, then a structured, tiled, planned, redacted one, then a second answer
    with other fields: (old, structured, other)."""
    _old_job(db)
    queue = await Queue.open(db)
    try:
        found = [
            Detection("roof", (10.0, 20.0, 400.0, 300.0), (2000, 1000)),
            Detection("chimney", (100.0, 50.0, 140.0, 120.0), (2000, 1000)),
        ]
        structured = await _finish(
            queue,
            1,
            STRUCTURED.to_dict(),
            Outcome(
                detections=found,
                reasoning=json.dumps(ANSWER),  # the generated JSON is the job's text
                answer=ANSWER,
                citations=[2, 1],
                planned_queries=["roof", "chimney"],
                tiling=TILING,
                redacted_path="redacted/2.jpg",
            ),
        )
        other = await _finish(
            queue,
            2,
            JobParams(("car",), "How many?", response_schema={"type": "object"}).to_dict(),
            Outcome(detections=[], reasoning=json.dumps(OTHER), answer=OTHER),
        )
    finally:
        await queue.close()
    return 1, structured, other


def test_extras_are_stored_as_json_and_null_when_absent(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"
    old, structured, other = asyncio.run(_history(db))
    rows = db_rows(
        db,
        "SELECT job_id, answer, citations, planned_queries, tiling, redacted_path FROM results"
        " ORDER BY job_id",
    )
    assert rows[0] == (old, None, None, None, None, None)
    assert rows[1][0] == structured
    assert [json.loads(str(v)) for v in rows[1][1:5]] == [
        ANSWER,
        [2, 1],
        ["roof", "chimney"],
        TILING,
    ]
    assert rows[1][5] == "redacted/2.jpg"
    assert rows[2] == (other, json.dumps(OTHER), "[]", None, None, None)


def test_image_of_gives_the_redacted_copy_and_the_classes(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"
    old, structured, _ = asyncio.run(_history(db))

    async def read() -> list[Any]:
        reads = Reads(read_engine(db))
        try:
            return [await reads.image_of(job_id) for job_id in (old, structured)]
        finally:
            await reads.close()

    plain, redacted = asyncio.run(read())
    assert (plain.path, plain.redacted_path, plain.redact) == ("images/old.jpg", None, ())
    assert (redacted.path, redacted.redacted_path, redacted.redact) == (
        "images/1.jpg",
        "redacted/2.jpg",
        ("person",),
    )


def test_job_json_shows_the_new_params_and_result_fields(settings: Settings, serve: Serve) -> None:
    settings.data_dir.mkdir(parents=True)
    old, structured, other = asyncio.run(_history(settings.database))
    service = serve(settings)

    response = service.client.get(f"/v1/jobs/{structured}")
    assert response.status_code == 200, response.text
    job = response.json()
    Job.model_validate(job)  # the documented contract, as typed() checked it
    assert job["params"] == STRUCTURED.to_dict()
    assert job["params"]["tiling"] == {"size": 992, "overlap": 124, "full_frame": True}
    result = job["result"]
    assert result["answer"] == ANSWER
    assert result["citations"] == [2, 1]
    assert result["planned_queries"] == ["roof", "chimney"]
    assert result["tiling"] == TILING
    assert result["reasoning"] == json.dumps(ANSWER)

    stored_before = service.client.get(f"/v1/jobs/{old}").json()
    assert stored_before["status"] == "succeeded"
    assert stored_before["params"] == {"queries": ["car"], "prompt": "p", "options": {}}
    assert stored_before["result"] == {
        "detections": [],
        "reasoning": "old text",
        "answer": None,
        "citations": [],
        "planned_queries": None,
        "tiling": None,
        "geo": None,  # stored before geometry was worked out
    }

    page = service.client.get("/v1/jobs")
    assert page.status_code == 200, page.text
    JobPage.model_validate(page.json())
    listed = {j["id"]: j for j in page.json()["jobs"]}
    assert listed[structured]["result"] == result
    assert listed[other]["result"]["answer"] == OTHER
    assert listed[old]["result"]["citations"] == []


def test_exports_carry_the_answer(settings: Settings, serve: Serve) -> None:
    settings.data_dir.mkdir(parents=True)
    old, structured, other = asyncio.run(_history(settings.database))
    service = serve(settings)

    response = service.client.get("/v1/exports/jobs.csv")
    assert response.status_code == 200, response.text
    rows = list(csv.DictReader(io.StringIO(response.text)))
    fields = [f for f in rows[0] if f.startswith("answer.")]
    # The union of the answers' fields, sorted.
    assert fields == [
        "answer.areas",
        "answer.count",
        "answer.damage",
        "answer.note",
        "answer.severe",
    ]
    by_job: dict[int, list[dict[str, str]]] = {}
    for row in rows:
        by_job.setdefault(int(row["job_id"]), []).append(row)
    assert len(by_job[structured]) == 2  # one row per detection, each with the answer
    for row in by_job[structured]:
        assert {f: row[f] for f in fields} == {
            "answer.areas": '["north","east"]',
            "answer.count": "3",
            "answer.damage": "collapsed chimney",
            "answer.note": "",  # not in this answer
            "answer.severe": "true",
        }
    (row,) = by_job[other]
    assert (row["answer.count"], row["answer.note"], row["answer.damage"]) == ("1", "null", "")
    (row,) = by_job[old]
    assert all(row[f] == "" for f in fields) and row["reasoning"] == "old text"

    response = service.client.get("/v1/exports/jobs.jsonl")
    assert response.status_code == 200, response.text
    lines = {j["id"]: j for j in map(json.loads, response.text.splitlines())}
    assert lines[structured]["result"]["answer"] == ANSWER
    assert lines[structured]["result"]["citations"] == [2, 1]
    assert lines[structured]["result"]["planned_queries"] == ["roof", "chimney"]
    assert lines[old]["result"]["answer"] is None

    # A filter narrows the fields to those of the jobs it exports.
    narrowed = service.client.get("/v1/exports/jobs.csv", params={"q": "collapsed"})
    header = next(csv.reader(io.StringIO(narrowed.text)))
    assert [f for f in header if f.startswith("answer.")] == fields[:3] + fields[4:]


def test_search_finds_words_of_a_structured_answer(settings: Settings, serve: Serve) -> None:
    settings.data_dir.mkdir(parents=True)
    _, structured, _ = asyncio.run(_history(settings.database))
    service = serve(settings)
    for words in ("chimney", "collapsed chimney", "north"):
        found = service.client.get("/v1/jobs", params={"q": words})
        assert found.status_code == 200, found.text
        assert [j["id"] for j in found.json()["jobs"]] == [structured], words
    assert service.client.get("/v1/jobs", params={"q": "south"}).json()["jobs"] == []


def test_answer_fields_include_what_unfinished_jobs_schemas_promise(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"
    asyncio.run(_history(db))

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        queue = await Queue.open(db)
        try:
            pending = JobParams(
                ("car",),
                "?",
                response_schema={"type": "object", "properties": {"waterline": {}}},
            )
            await queue.enqueue(_image(9), pending.to_dict(), input_name="9.jpg")
        finally:
            await queue.close()
        reads = Reads(read_engine(db))
        try:
            return (
                await reads.answer_fields(JobFilter()),
                await reads.answer_fields(JobFilter.parse(status="succeeded")),
                await reads.answer_fields(JobFilter.parse(q="waterline")),
            )
        finally:
            await reads.close()

    everything, finished, nothing = asyncio.run(scenario())
    assert everything == ["areas", "count", "damage", "note", "severe", "waterline"]
    assert finished == ["areas", "count", "damage", "note", "severe"]
    assert nothing == []
