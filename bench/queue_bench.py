"""Queue benchmark (issue row 1): the project's `Queue` driven as the worker drives it, with a
null pipeline (enqueue; then each completion claims the next job in the same commit), against
a raw `sqlite3` loop of the same statements in the same transactions and against Huey's SQLite
queue, each job its own transactions at the service's durability; and 32 concurrent HTTP
submitters to a real service with an idle worker against Huey's enqueue rate.

    .venv/bin/python -m bench.queue_bench [--quick]
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image

from bench import idle_service
from bench.profiling import hotspots
from bench.table import Row, compare, interleaved, main_for, median
from service.store.migrate import migrate
from service.store.queue import ClaimNext, ImageRecord, Outcome, Queue

PARAMS = {"queries": ["car"], "prompt": "Describe.", "options": {}}

# The 32-submitter row's profile runs in the service's process, so it is not taken live; this
# one was taken with pyinstrument on 2026-11-28, after group commit landed.
HTTP_FINDING = (
    "profile (pyinstrument, service process, with group commit and Core reads): our submit "
    "route is ~17% of the event loop: the multipart form ~27% of it, reading the job back for "
    "the 202 body (one read-thread hop) ~21%, Queue.enqueue ~12% (submissions waiting "
    "together share a COMMIT), pydantic ~7%; the other ~83% of the loop is uvicorn/h11, "
    "middleware and framework per request, and the client shares the 2 cores. Huey's rate is "
    "an in-process function call with no HTTP; 2x it over HTTP is over a thousand requests/s, "
    "while a bare Starlette JSON route on the same uvicorn serves ~170/s with 32 clients on "
    "these 2 cores (api rows): no route could meet it here. The read-back stays: enqueue "
    "returns (job id, created), and the body equal to GET also needs the commit's "
    "created_at and the stored image row (an image seen before keeps its first EXIF and "
    "capture time), so building it without the read means enqueue returning those, a "
    "change to its (id, created) contract. Closing more: that, a JSON submit path "
    "without multipart, fewer middleware layers"
)


def _record(i: int, salt: str) -> ImageRecord:
    sha = hashlib.sha256(f"{salt}-{i}".encode()).hexdigest()
    return ImageRecord(sha, 1000, 64, 48, "JPEG", f"images/{sha[:2]}/{sha}.jpg")


# -- ours: the real Queue ----------------------------------------------------------------------


async def _ours(queue: Queue, jobs: int, salt: str) -> float:
    """A busy worker: job i+1 is queued while job i runs, and the commit that completes job i
    claims job i+1 (service/worker.py's loop); the first job is claimed on its own, and the
    last completion finds nothing left to claim. 2 commits a job, plus one."""
    began = time.perf_counter()
    await queue.enqueue(_record(0, salt), PARAMS, input_name="0.jpg")
    claim = await queue.claim("bench", 60.0)
    for i in range(1, jobs + 1):
        if i < jobs:
            await queue.enqueue(_record(i, salt), PARAMS, input_name=f"{i}.jpg")
        assert claim is not None
        done, claim = await queue.complete_and_claim(
            claim, Outcome(detections=[], reasoning="ok"), claim_next=ClaimNext("bench", 60.0)
        )
        assert done
    assert claim is None
    return jobs / (time.perf_counter() - began)


async def _round_trip(queue: Queue, calls: int = 200) -> float:
    """Seconds one empty call to the writer thread and back takes (the hop every
    transaction pays), the median of `calls`."""
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        await queue.read(lambda _conn: None)
        times.append(time.perf_counter() - began)
    return median(times)


# -- baseline A: the same statements on plain sqlite3 ------------------------------------------


def _raw_connection(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        db.execute(f"PRAGMA {pragma}")
    return db


def _raw_enqueue(db: sqlite3.Connection, i: int, salt: str) -> None:
    image, now = _record(i, salt), time.time()
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        "INSERT INTO images (sha256, bytes, width, height, format, path, exif, created_at,"
        " captured_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE"
        " SET pruned_at = NULL, path = excluded.path",
        (image.sha256, image.bytes, image.width, image.height, image.format, image.path,
         None, now, None),
    )  # fmt: skip
    db.execute(
        "INSERT INTO jobs (source, source_path, image_sha256, input_name, params,"
        " max_attempts, run_after, created_at, idempotency_key, request_hash)"
        " VALUES ('api', NULL, ?, ?, ?, 3, ?, ?, NULL, NULL)",
        (image.sha256, f"{i}.jpg", json.dumps(PARAMS), now, now),
    )
    db.execute("COMMIT")


def _raw_claim(db: sqlite3.Connection) -> tuple[int, int] | None:
    """Queue._claim's statements, inside the caller's transaction."""
    now = time.time()
    row = db.execute(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = ?,"
        " lease_until = ?, started_at = coalesce(started_at, ?) WHERE id = (SELECT id FROM"
        " jobs WHERE status = 'queued' AND run_after <= ? ORDER BY run_after, id LIMIT 1)"
        " RETURNING id, attempts, image_sha256, params, coalesce(queued_at, created_at),"
        " started_at, attempts - max_attempts + coalesce(attempt_budget, max_attempts)",
        ("bench", now + 60, now, now),
    ).fetchone()
    if row is None:
        return None
    job_id, attempt, sha, params = row[:4]
    json.loads(params)
    db.execute("SELECT path FROM images WHERE sha256 = ?", (sha,)).fetchone()
    db.execute(
        "INSERT INTO job_attempts (job_id, attempt, worker, started_at) VALUES (?, ?, ?, ?)",
        (job_id, attempt, "bench", now),
    )
    return job_id, attempt


def _raw_complete(db: sqlite3.Connection, job_id: int, attempt: int) -> None:
    """Queue.complete's statements (no detections), inside the caller's transaction."""
    now = time.time()
    assert db.execute(
        "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND lease_owner = ?"
        " AND attempts = ?",
        (job_id, "bench", attempt),
    ).fetchone()
    db.execute(
        "INSERT INTO results (job_id, reasoning, created_at) VALUES (?, ?, ?)",
        (job_id, "ok", now),
    )
    db.execute(
        "UPDATE job_attempts SET finished_at = ?, outcome = 'succeeded', error_code = NULL,"
        " error_message = NULL WHERE job_id = ? AND attempt = ? AND worker = ?"
        " AND finished_at IS NULL",
        (now, job_id, attempt, "bench"),
    )
    db.execute(
        "UPDATE jobs SET status = 'succeeded', finished_at = ?, lease_owner = NULL,"
        " lease_until = NULL, error_code = NULL, error_message = NULL, timings = ?,"
        " models = ? WHERE id = ?",
        (now, json.dumps({"persist": 0.1}), "{}", job_id),
    )


def _raw(db: sqlite3.Connection, jobs: int, salt: str) -> float:
    """What `_ours` executes, statement for statement, in the same transactions."""
    began = time.perf_counter()
    _raw_enqueue(db, 0, salt)
    db.execute("BEGIN IMMEDIATE")
    claim = _raw_claim(db)
    db.execute("COMMIT")
    for i in range(1, jobs + 1):
        if i < jobs:
            _raw_enqueue(db, i, salt)
        assert claim is not None
        db.execute("BEGIN IMMEDIATE")
        _raw_complete(db, *claim)
        claim = _raw_claim(db)
        db.execute("COMMIT")
    assert claim is None
    return jobs / (time.perf_counter() - began)


# -- baseline B: Huey's SQLite queue, defaults, no-op tasks --------------------------------------


def _huey(path: Path) -> tuple[object, Callable[[], object]]:
    from huey import SqliteHuey

    huey = SqliteHuey(filename=str(path))

    @huey.task()
    def noop() -> None:
        return None

    return huey, noop


def _huey_round(huey: object, noop: Callable[[], object], jobs: int) -> float:
    """Enqueue, then what a consumer worker does: dequeue and execute (no result: None)."""
    began = time.perf_counter()
    for _ in range(jobs):
        noop()
        task = huey.dequeue()  # type: ignore[attr-defined]
        huey.execute(task)  # type: ignore[attr-defined]
    return jobs / (time.perf_counter() - began)


def _huey_enqueue(noop: Callable[[], object], jobs: int) -> float:
    began = time.perf_counter()
    for _ in range(jobs):
        noop()
    return jobs / (time.perf_counter() - began)


def _synchronous(path: Path) -> int:
    """The synchronous level a default Huey connection ends up with (WAL's default: FULL)."""
    huey, _ = _huey(path)
    conn = huey.storage.conn  # type: ignore[attr-defined]
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


# -- 32 submitters over HTTP to a real service with an idle worker -------------------------------


def small_jpeg(i: int) -> bytes:
    image = Image.new("RGB", (64, 48), (i % 256, (i // 256) % 256, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


async def _submit_round(url: str, jobs: int, clients: int, offset: int) -> float:
    images = [small_jpeg(offset + i) for i in range(jobs)]
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def submitter(k: int) -> None:
            for i in range(k, jobs, clients):
                response = await client.post(
                    "/v1/jobs", files={"image": (f"{i}.jpg", images[i], "image/jpeg")}
                )
                if response.status_code != 202:
                    raise RuntimeError(f"submit refused: {response.status_code} {response.text}")

        began = time.perf_counter()
        await asyncio.gather(*(submitter(k) for k in range(clients)))
        return jobs / (time.perf_counter() - began)


# -- the benchmark -----------------------------------------------------------------------------


def run(quick: bool) -> list[Row]:
    jobs, rounds = (40, 3) if quick else (200, 5)
    http_jobs, clients = (96, 32) if quick else (640, 32)
    work = Path(tempfile.mkdtemp(prefix="aip-bench-queue-"))
    ours_db, raw_db = work / "ours.db", work / "raw.db"
    migrate(ours_db)
    migrate(raw_db)
    loop = asyncio.new_event_loop()
    queue = loop.run_until_complete(Queue.open(ours_db))
    raw = _raw_connection(raw_db)
    huey, noop = _huey(work / "huey.db")
    huey_sync = _synchronous(work / "huey.db")
    count = iter(range(10**9))
    try:
        samples = interleaved(
            {
                "ours": lambda: loop.run_until_complete(_ours(queue, jobs, f"o{next(count)}")),
                "raw": lambda: _raw(raw, jobs, f"r{next(count)}"),
                "huey": lambda: _huey_round(huey, noop, jobs),
            },
            rounds,
        )
        # A target missed: where the time goes, profiled now, on the Queue as it is today.
        bar = max(0.5 * median(samples["raw"]), median(samples["huey"]))
        finding = hop = ""
        if median(samples["ours"]) < bar:
            finding = hotspots(lambda: loop.run_until_complete(_ours(queue, jobs, "profiled")))
            hop = f"{loop.run_until_complete(_round_trip(queue)) * 1e6:.0f} µs"
        with idle_service.running(work / "service") as url:
            loop.run_until_complete(_submit_round(url, clients, clients, 10**6))  # warm-up
            offsets = iter(range(0, 10**9, http_jobs))
            http = interleaved(
                {
                    "ours": lambda: loop.run_until_complete(
                        _submit_round(url, http_jobs, clients, next(offsets))
                    ),
                    "huey": lambda: _huey_enqueue(noop, http_jobs),
                },
                rounds,
            )
    finally:
        loop.run_until_complete(queue.close())
        loop.close()
        raw.close()
    ours = median(samples["ours"])
    sync_note = f"synchronous=FULL both; {jobs} jobs × {rounds} rounds, interleaved"
    huey_level = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(huey_sync, str(huey_sync))
    return [
        compare(
            "enqueue + claim + complete, vs raw sqlite3",
            ours,
            median(samples["raw"]),
            unit="jobs/s",
            at_least=0.5,
            note=sync_note + (f". Profile (pyinstrument, this run): {finding}" if finding else ""),
        ),
        compare(
            "enqueue + claim + complete, vs Huey SqliteHuey",
            ours,
            median(samples["huey"]),
            unit="jobs/s",
            at_least=1.0,
            note=f"Huey defaults (WAL, synchronous={huey_level}), no-op tasks, no lease and "
            "no result row kept; 2 commits a job both (Huey: enqueue, dequeue; ours: enqueue, "
            "then completion + the next claim in one commit, as the worker runs); the raw "
            "sqlite3 loop of our statements in our transactions reaches "
            f"{median(samples['raw']) / median(samples['huey']):.2f}× Huey in this run"
            + (
                ". Finding (profile above): at equal commits a job, raw's ratio to Huey says "
                "what our statements (result, attempt and lease rows) cost against Huey's; a "
                "free Python side would reach that ratio and no more. Ours vs raw loses two "
                f"event loop -> writer thread round trips a job ({hop} each, empty, in this "
                "run) and the writer thread's own Python. Beating Huey needs fewer fsyncs than "
                "it: the service's group commit shares a completion's commit with submissions "
                "arriving meanwhile (tests/test_queue_commits.py), which this one-at-a-time loop "
                "cannot show. Writing on the event loop's own thread would stall every request "
                "for an fsync: not taken"
                if finding
                else ""
            ),
        ),
        compare(
            f"{clients} HTTP submitters, idle worker, vs Huey enqueue",
            median(http["ours"]),
            median(http["huey"]),
            unit="jobs/s",
            at_least=2.0,
            note=f"accepted (202) jobs/s of 64×48 JPEGs against one thread calling a Huey "
            f"task; {http_jobs} jobs × {rounds} rounds"
            + (f". {HTTP_FINDING}" if median(http["ours"]) < 2 * median(http["huey"]) else ""),
        ),
    ]


def profile(jobs: int = 300) -> None:
    """`python -c 'from bench.queue_bench import profile; profile()'`: where Queue's time goes."""
    from pyinstrument import Profiler

    work = Path(tempfile.mkdtemp(prefix="aip-bench-queue-prof-"))
    migrate(work / "q.db")

    async def go() -> None:
        queue = await Queue.open(work / "q.db")
        with Profiler(async_mode="enabled") as profiler:
            await _ours(queue, jobs, "p")
        await queue.close()
        print(profiler.output_text(unicode=False, color=False, show_all=False))

    asyncio.run(go())


if __name__ == "__main__":
    main_for("queue", run, __doc__)
