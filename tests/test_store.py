"""The store on a real SQLite file: migrations, and the queue's state machine and fences."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from service.detection import Detection
from service.errors import Conflict, JobFailure
from service.store.migrate import load_migrations, migrate, schema_version, split_statements
from service.store.queue import ImageRecord, Outcome, Queue
from service.store.tables import (
    AttemptRow,
    DetectionRow,
    ImageRow,
    InboxFileRow,
    JobRow,
    ResultRow,
)

IMAGE = ImageRecord(
    sha256="ab" * 32, bytes=10, width=100, height=50, format="JPEG", path="images/ab/x.jpg"
)
PARAMS = {"queries": ["car"], "prompt": "what?", "options": {}}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _queue(db: Path, clock: Clock | None = None) -> Queue:
    migrate(db)
    return await Queue.open(db, clock=clock or Clock())


def test_upgrade_from_first_migration_keeps_rows(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"
    assert migrate(db, upto=1) == [1]
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO images VALUES ('s', 3, 4, 5, 'PNG', 'images/s.png', NULL, 1.0)")
    conn.execute(
        "INSERT INTO jobs (status, image_sha256, input_name, params, run_after, created_at)"
        " VALUES ('succeeded', 's', 'old.png', '{}', 1.0, 1.0)"
    )
    conn.execute("INSERT INTO results VALUES (1, 'kept', 2.0)")
    conn.commit()
    conn.close()

    latest = max(m.version for m in load_migrations())
    assert migrate(db)[-1] == latest
    assert schema_version(db) == latest
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT input_name, status, cancel_requested FROM jobs").fetchall() == [
        ("old.png", "succeeded", 0)
    ]
    assert conn.execute("SELECT reasoning FROM results").fetchall() == [("kept",)]
    assert migrate(db) == []  # applied once, recorded


def test_an_edited_landed_migration_stops_start_up(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_a.sql").write_text("CREATE TABLE a (x INTEGER);\n")
    db = tmp_path / "aip.db"
    migrate(db, folder=folder)
    (folder / "0001_a.sql").write_text("CREATE TABLE a (x INTEGER, y TEXT);\n")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        migrate(db, folder=folder)


def test_a_failing_migration_leaves_nothing_half_applied(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_a.sql").write_text("CREATE TABLE a (x INTEGER);\nCREATE TABLE a (y);\n")
    db = tmp_path / "aip.db"
    with pytest.raises(sqlite3.OperationalError):
        migrate(db, folder=folder)
    conn = sqlite3.connect(db)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "a" not in tables
    assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (0,)


def test_split_statements_keeps_triggers_whole() -> None:
    sql = (
        "-- comment\nCREATE TABLE t (x);\n"
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN\n  UPDATE t SET x = 1;\nEND;\n"
    )
    parts = split_statements(sql)
    assert len(parts) == 2
    assert parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")


def test_sqlmodel_tables_mirror_the_migrated_schema(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"
    migrate(db)
    conn = sqlite3.connect(db)
    for table in (ImageRow, JobRow, ResultRow, DetectionRow, AttemptRow, InboxFileRow):
        name = table.__tablename__
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({name})")}
        assert columns == set(table.model_fields), name


def test_pragmas_wal_full_sync_foreign_keys(tmp_path: Path) -> None:
    async def check() -> tuple[str, int, int, int]:
        queue = await _queue(tmp_path / "aip.db")
        conn = queue._conn
        mode = (await (await conn.execute("PRAGMA journal_mode")).fetchone())[0]
        sync = (await (await conn.execute("PRAGMA synchronous")).fetchone())[0]
        fks = (await (await conn.execute("PRAGMA foreign_keys")).fetchone())[0]
        busy = (await (await conn.execute("PRAGMA busy_timeout")).fetchone())[0]
        await queue.close()
        return mode, sync, fks, busy

    mode, sync, fks, busy = run(check())
    assert (mode, sync, fks) == ("wal", 2, 1)  # 2 = FULL
    assert busy >= 1000


def test_claim_takes_oldest_and_each_job_once(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        queue = await _queue(tmp_path / "aip.db")
        for _ in range(3):
            await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg")
        claims = await asyncio.gather(*(queue.claim(f"w{i}", 30) for i in range(5)))
        await queue.close()
        return [c.job_id for c in claims if c is not None]

    assert sorted(run(scenario())) == [1, 2, 3]


def test_completion_is_fenced_by_owner_and_attempt(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        queue = await _queue(tmp_path / "aip.db", clock)
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg")
        stale = await queue.claim("old-worker", lease_seconds=10)
        assert stale is not None
        clock.now += 11  # the lease runs out; the job goes back and a new worker takes it
        assert await queue.recover(expired_only=True) == (1, 0)
        fresh = await queue.claim("new-worker", lease_seconds=10)
        assert fresh is not None and fresh.attempt == 2
        box = Detection("car", (1, 2, 3, 4), (100, 50))
        assert not await queue.complete(stale, Outcome([box], "stale"))
        assert (await queue.heartbeat(stale, 10)).owned is False
        assert await queue.fail(stale, JobFailure("x", "y", transient=True), retry_in=0) is None
        assert await queue.complete(fresh, Outcome([box, box], "fresh"))
        assert not await queue.complete(fresh, Outcome([], "twice"))  # at most one result
        conn = queue._conn
        rows = await (await conn.execute("SELECT reasoning FROM results")).fetchall()
        assert [r[0] for r in rows] == ["fresh"]
        n = await (await conn.execute("SELECT count(*) FROM detections")).fetchone()
        assert n[0] == 2
        outcomes = await (
            await conn.execute("SELECT worker, outcome FROM job_attempts ORDER BY id")
        ).fetchall()
        assert [tuple(r) for r in outcomes] == [("old-worker", "lost"), ("new-worker", "succeeded")]
        await queue.close()

    run(scenario())


def test_transient_failure_retries_until_attempts_are_used(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> list[str | None]:
        queue = await _queue(tmp_path / "aip.db", clock)
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=2)
        statuses = []
        for _ in range(2):
            claim = await queue.claim("w", 30)
            assert claim is not None
            boom = JobFailure("model_error", "boom", transient=True)
            statuses.append(await queue.fail(claim, boom, retry_in=5))
            assert await queue.claim("w", 30) is None  # backoff: not runnable yet
            clock.now += 5
        await queue.close()
        return statuses

    assert run(scenario()) == ["queued", "failed"]


def test_permanent_failure_does_not_retry(tmp_path: Path) -> None:
    async def scenario() -> str | None:
        queue = await _queue(tmp_path / "aip.db")
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=3)
        claim = await queue.claim("w", 30)
        assert claim is not None
        bad = JobFailure("corrupt_image", "bad bytes", transient=False)
        status = await queue.fail(claim, bad, retry_in=None)
        await queue.close()
        return status

    assert run(scenario()) == "failed"


def test_start_up_recovery_requeues_or_fails_when_attempts_are_used(tmp_path: Path) -> None:
    async def scenario() -> tuple[tuple[int, int], dict[str, int]]:
        queue = await _queue(tmp_path / "aip.db")
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=1)
        await queue.enqueue(IMAGE, PARAMS, input_name="b.jpg", max_attempts=3)
        await queue.claim("dead", 30)
        await queue.claim("dead", 30)
        result = await queue.recover(expired_only=False)
        counts = await queue.counts()
        await queue.close()
        return result, counts

    (requeued, failed), counts = run(scenario())
    assert (requeued, failed) == (1, 1)
    assert counts["queued"] == 1 and counts["failed"] == 1 and counts["running"] == 0


def test_cancel_and_retry_transitions(tmp_path: Path) -> None:
    async def scenario() -> None:
        queue = await _queue(tmp_path / "aip.db")
        a, _ = await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg")
        b, _ = await queue.enqueue(IMAGE, PARAMS, input_name="b.jpg")
        assert await queue.request_cancel(a) == "cancelled"
        with pytest.raises(Conflict):
            await queue.request_cancel(a)
        claim = await queue.claim("w", 30)
        assert claim is not None and claim.job_id == b
        assert await queue.request_cancel(b) == "running"
        assert (await queue.heartbeat(claim, 30)).cancel_requested
        assert await queue.finish_cancelled(claim, "stopped")
        await queue.retry(a)
        again = await queue.claim("w", 30)
        assert again is not None and again.job_id == a and again.attempt == 1
        with pytest.raises(Conflict):
            await queue.retry(a)  # running, not retryable
        await queue.close()

    run(scenario())


def test_release_gives_the_job_back_without_spending_an_attempt(tmp_path: Path) -> None:
    async def scenario() -> None:
        queue = await _queue(tmp_path / "aip.db")
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg")
        claim = await queue.claim("w", 30)
        assert claim is not None
        assert await queue.release(claim)
        again = await queue.claim("w2", 30)
        assert again is not None and again.attempt == 1
        await queue.close()

    run(scenario())


def test_idempotency_key_returns_original_or_conflicts(tmp_path: Path) -> None:
    async def scenario() -> None:
        queue = await _queue(tmp_path / "aip.db")
        first = await queue.enqueue(
            IMAGE, PARAMS, input_name="a", idempotency_key="k", request_hash="h1"
        )
        again = await queue.enqueue(
            IMAGE, PARAMS, input_name="a", idempotency_key="k", request_hash="h1"
        )
        assert first == (1, True) and again == (1, False)
        with pytest.raises(Conflict):
            await queue.enqueue(
                IMAGE, PARAMS, input_name="a", idempotency_key="k", request_hash="h2"
            )
        assert (await queue.counts())["queued"] == 1
        await queue.close()

    run(scenario())


def test_a_cancelled_transaction_never_wedges_the_writer(tmp_path: Path) -> None:
    async def scenario() -> int:
        queue = await _queue(tmp_path / "aip.db")
        for _ in range(20):  # cancel at every point a task can be cancelled
            task = asyncio.create_task(queue.enqueue(IMAGE, PARAMS, input_name="a.jpg"))
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        job_id, created = await queue.enqueue(IMAGE, PARAMS, input_name="b.jpg")
        assert created and not queue._conn.in_transaction
        await queue.close()
        return job_id

    assert run(scenario()) > 0


def test_a_cancel_requested_while_running_wins_over_a_requeue(tmp_path: Path) -> None:
    async def scenario() -> list[str | None]:
        queue = await _queue(tmp_path / "aip.db")
        outcomes: list[str | None] = []
        for path in ("retry", "release", "crash"):
            job_id, _ = await queue.enqueue(IMAGE, PARAMS, input_name=f"{path}.jpg")
            claim = await queue.claim("w", 30)
            assert claim is not None and claim.job_id == job_id
            assert await queue.request_cancel(job_id) == "running"
            if path == "retry":
                outcomes.append(
                    await queue.fail(claim, JobFailure("x", "y", transient=True), retry_in=0)
                )
            elif path == "release":
                await queue.release(claim)
            else:
                await queue.recover(expired_only=False)
            cursor = await queue._conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,))
            outcomes.append((await cursor.fetchone())[0])
        await queue.close()
        return outcomes

    assert run(scenario()) == ["cancelled"] * 4
