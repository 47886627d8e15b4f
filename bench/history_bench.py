"""History benchmark: filter latency over a large job table and export throughput, against
baselines measured in the same run (an unfiltered page; raw sqlite3 reading the same rows).

    .venv/bin/python bench/history_bench.py [--jobs 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from service.exports import WRITERS
from service.store.history import JobFilter
from service.store.migrate import migrate
from service.store.reads import Reads
from service.store.sqlite import read_engine

LABELS = ["car", "truck", "person", "boat", "roof", "tree"]
WORDS = ["flooding", "tractor", "erosion", "damage", "clear", "debris", "crowd", "smoke"]


def seed(db_path: Path, jobs: int) -> None:
    rand = random.Random(1)
    now = time.time()
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA synchronous=OFF")
    with db:
        for job_id in range(1, jobs + 1):
            sha = f"{job_id:064x}"
            created = now - (jobs - job_id) * 30.0  # one job every 30 s, oldest first
            folder = f"flights/{job_id // 5000:03d}"
            db.execute(
                "INSERT INTO images (sha256, bytes, width, height, format, path, created_at,"
                " captured_at) VALUES (?, 4000000, 4000, 3000, 'JPEG', ?, ?, ?)",
                (
                    sha,
                    f"images/{sha[:2]}/{sha}.jpg",
                    created,
                    time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)),
                ),
            )
            status = "succeeded" if rand.random() < 0.9 else rand.choice(["failed", "cancelled"])
            db.execute(
                "INSERT INTO jobs (id, status, source, source_path, image_sha256, input_name,"
                " params, run_after, created_at, finished_at, attempts, timings)"
                " VALUES (?, ?, 'inbox', ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                (
                    job_id,
                    status,
                    f"{folder}/IMG_{job_id}.jpg",
                    sha,
                    f"IMG_{job_id}.jpg",
                    json.dumps({"queries": LABELS[:3], "prompt": "Describe.", "options": {}}),
                    created,
                    created,
                    created + 4,
                    json.dumps({"detect": 900.0, "reason": 2100.0, "total": 3100.0}),
                ),
            )
            if status == "succeeded":
                reasoning = " ".join(rand.sample(WORDS, 3))
                db.execute("INSERT INTO results VALUES (?, ?, ?)", (job_id, reasoning, created))
                db.executemany(
                    "INSERT INTO detections (job_id, idx, label, x1, y1, x2, y2)"
                    " VALUES (?, ?, ?, 100, 100, 300, 250)",
                    [(job_id, i + 1, rand.choice(LABELS)) for i in range(rand.randint(0, 6))],
                )
    db.close()


async def timed(call: Callable[[], Awaitable[Any]], runs: int = 15) -> float:
    await call()  # warm the page cache and statement cache
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def run(jobs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="aip-history-"))
    db_path = work / "aip.db"
    migrate(db_path)
    start = time.perf_counter()
    seed(db_path, jobs)
    seeded = time.perf_counter() - start
    reads = Reads(read_engine(db_path))
    day_ago = str(time.time() - 86400)
    filters = {
        "baseline: newest 50, no filter": {},
        "status=failed": {"status": "failed"},
        "created_after=1 day ago": {"created_after": day_ago},
        "folder=flights/007": {"folder": "flights/007"},
        "label=boat": {"label": "boat"},
        "label=car&min_count=4": {"label": "car", "min_count": 4},
        "q=flooding smoke (FTS)": {"q": "flooding smoke"},
        "captured range (1 day)": {
            "captured_after": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 86400))
        },
        "label=boat, sorted by finished": {"label": "boat", "_sort": "finished"},
    }
    print(f"\nhistory benchmark: {jobs:,} jobs (seeded in {seeded:.1f} s), 2 cores\n")
    print(f"{'query (first page of 50)':<36}{'median ms':>10}")
    for label, raw in filters.items():
        sort = raw.pop("_sort", "created")
        where = JobFilter.parse(**raw)
        ms = await timed(lambda w=where, s=sort: reads.page(w, sort=s, limit=50))
        print(f"{label:<36}{ms:>10.2f}")
    page = await reads.page(JobFilter(), limit=50)
    ms = await timed(lambda: reads.page(JobFilter(), cursor=page["next_cursor"], limit=50))
    print(f"{'next page (keyset cursor)':<36}{ms:>10.2f}")

    print(
        f"\n{'export (all jobs)':<20}{'s':>8}{'jobs/s':>10}{'MB':>8}{'MB/s':>8}{'max RSS MB':>12}"
    )
    start = time.perf_counter()
    raw_db = sqlite3.connect(db_path)
    rows = 0
    for _ in raw_db.execute(
        "SELECT * FROM jobs JOIN images ON images.sha256 = jobs.image_sha256"
        " LEFT JOIN results ON results.job_id = jobs.id"
    ):
        rows += 1
    raw_s = time.perf_counter() - start
    print(
        f"{'baseline: raw rows':<20}{raw_s:>8.1f}{rows / raw_s:>10.0f}{'':>8}{'':>8}"
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:>12.0f}"
    )
    for fmt, writer in WRITERS.items():
        start, size = time.perf_counter(), 0
        async for chunk in writer(reads.iter_jobs(JobFilter())):
            size += len(chunk.encode())
        seconds = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"{fmt:<20}{seconds:>8.1f}{jobs / seconds:>10.0f}{size / 1e6:>8.1f}"
            f"{size / 1e6 / seconds:>8.1f}{rss:>12.0f}"
        )
    await reads.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    asyncio.run(run(parser.parse_args().jobs))


if __name__ == "__main__":
    main()
