"""The store on a real SQLite file: migrations, and the queue's state machine and fences."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.detection import Detection
from service.errors import Conflict, DiskFull, JobFailure
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
from tests.conftest import db_rows

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


async def _select(queue: Queue, sql: str, *args: object) -> list[sqlite3.Row]:
    return await queue.read(lambda conn: conn.execute(sql, args).fetchall())


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
        values = await queue.read(
            lambda conn: [
                conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            ]
        )
        await queue.close()
        mode, sync, fks, busy = values
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
        rows = await _select(queue, "SELECT reasoning FROM results")
        assert [r[0] for r in rows] == ["fresh"]
        n = await _select(queue, "SELECT count(*) FROM detections")
        assert n[0][0] == 2
        outcomes = await _select(queue, "SELECT worker, outcome FROM job_attempts ORDER BY id")
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
        # A new number (never reused), first of its round: the budget grew by the one given back.
        assert again is not None and (again.attempt, again.round_attempt) == (2, 1)
        budget = await queue.read(
            lambda db: db.execute("SELECT max_attempts FROM jobs").fetchone()[0]
        )
        assert budget == 4
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
        assert created and not queue.writer.in_transaction
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
            rows = await _select(queue, "SELECT status FROM jobs WHERE id = ?", job_id)
            outcomes.append(rows[0][0])
        await queue.close()
        return outcomes

    assert run(scenario()) == ["cancelled"] * 4


def test_a_retry_starts_a_new_round_so_backoff_starts_small_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        queue = await _queue(tmp_path / "aip.db")
        job, _ = await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=2)
        transient = JobFailure("flaky", "try later", transient=True)
        rounds = []
        for _ in range(2):
            for _ in range(2):
                claim = await queue.claim("w", 30)
                assert claim is not None and claim.job_id == job
                rounds.append((claim.attempt, claim.round_attempt))
                await queue.fail(claim, transient, retry_in=0)
            await queue.retry(job)
        assert rounds == [(1, 1), (2, 2), (3, 1), (4, 2)]
        await queue.close()

    run(scenario())


# -- group commit: concurrent intake shares one transaction and one COMMIT -----------------------


def _image(n: int) -> ImageRecord:
    sha = f"{n:064x}"
    return ImageRecord(sha256=sha, bytes=10, width=8, height=8, format="PNG", path=f"{sha}.png")


@contextlib.asynccontextmanager
async def _writer_busy(queue: Queue) -> AsyncIterator[None]:
    """Keeps the writer thread busy for the block, so the writes started in it are all waiting
    together when it is free again (what a burst of submissions does during an fsync)."""
    gate = threading.Event()
    blocker = asyncio.create_task(queue.read(lambda _conn: gate.wait(10)))
    try:
        yield
        for _ in range(3):  # every task started in the block reaches the writer's queue
            await asyncio.sleep(0)
    finally:
        gate.set()
        await blocker


def test_concurrent_enqueues_share_commits_and_all_survive_a_reopen(tmp_path: Path) -> None:
    db, n = tmp_path / "aip.db", 50

    async def scenario() -> tuple[list[tuple[int, bool]], int]:
        queue = await _queue(db)
        commits: list[str] = []
        await queue.read(
            lambda conn: conn.set_trace_callback(
                lambda sql: commits.append(sql) if sql == "COMMIT" else None
            )
        )
        async with _writer_busy(queue):
            tasks = [
                asyncio.create_task(queue.enqueue(_image(i), PARAMS, input_name=f"{i}.png"))
                for i in range(n)
            ]
        results = await asyncio.gather(*tasks)
        await queue.close()
        return results, len(commits)

    results, commits = run(scenario())
    assert all(created for _, created in results)
    ids = [job_id for job_id, _ in results]
    assert len(set(ids)) == n
    assert 1 <= commits < n  # behaviour, not timing: they shared commits
    assert sorted(row[0] for row in db_rows(db, "SELECT id FROM jobs")) == sorted(ids)
    assert db_rows(db, "SELECT count(*) FROM images") == [(n,)]


def test_in_a_group_a_conflict_or_an_error_fails_only_its_own_caller(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"

    async def scenario() -> list[object]:
        queue = await _queue(db)
        await queue.enqueue(
            _image(0), PARAMS, input_name="0", idempotency_key="k", request_hash="a"
        )
        async with _writer_busy(queue):
            calls = [
                queue.enqueue(_image(1), PARAMS, input_name="1"),
                # the key's first request, then the same key with other parameters
                queue.enqueue(_image(2), PARAMS, input_name="2", idempotency_key="new",
                              request_hash="a"),
                queue.enqueue(_image(3), PARAMS, input_name="3", idempotency_key="k",
                              request_hash="b"),
                queue.enqueue(_image(4), PARAMS, input_name="4", idempotency_key="new",
                              request_hash="b"),
                # fails after its image row is written: that row must go with it
                queue.enqueue(_image(5), {"unserialisable": object()}, input_name="5"),
                queue.enqueue(_image(6), PARAMS, input_name="6", idempotency_key="k",
                              request_hash="a"),
            ]  # fmt: skip
            tasks = [asyncio.create_task(call) for call in calls]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await queue.close()
        return results

    results = run(scenario())
    assert results[0] == (2, True) and results[1] == (3, True) and results[5] == (1, False)
    assert isinstance(results[2], Conflict) and isinstance(results[3], Conflict)
    assert isinstance(results[4], TypeError)
    assert db_rows(db, "SELECT input_name FROM jobs ORDER BY id") == [("0",), ("1",), ("2",)]
    assert db_rows(db, "SELECT count(*) FROM images") == [(3,)]


def test_a_cancelled_enqueue_leaves_its_whole_job_or_nothing(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"

    async def scenario() -> None:
        queue = await _queue(db)
        # Cancelled while waiting for the writer, together with others that are not.
        async with _writer_busy(queue):
            tasks = [
                asyncio.create_task(queue.enqueue(_image(i), PARAMS, input_name=f"{i}"))
                for i in range(6)
            ]
            for _ in range(2):
                await asyncio.sleep(0)
            for task in tasks[::2]:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Cancelled in the middle of its transaction (between its two INSERTs).
        inside, go_on = threading.Event(), threading.Event()

        def trace(sql: str) -> None:
            if sql.startswith("INSERT INTO jobs"):
                inside.set()
                go_on.wait(10)

        await queue.read(lambda conn: conn.set_trace_callback(trace))
        task = asyncio.create_task(queue.enqueue(_image(9), PARAMS, input_name="9"))
        assert await asyncio.to_thread(inside.wait, 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        go_on.set()
        await queue.read(lambda conn: conn.set_trace_callback(None))
        assert not queue.writer.in_transaction
        await queue.close()

    run(scenario())
    jobs = {row[0] for row in db_rows(db, "SELECT image_sha256 FROM jobs")}
    images = {row[0] for row in db_rows(db, "SELECT sha256 FROM images")}
    assert jobs == images  # no image row without its job, no job without its image
    assert {_image(i).sha256 for i in (1, 3, 5)} <= jobs  # those not cancelled are all there


def test_a_failed_group_commit_fails_every_caller_and_keeps_nothing(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"

    def no_commit(action: int, arg1: str | None, *_: object) -> int:
        refuse = action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT"
        return sqlite3.SQLITE_DENY if refuse else sqlite3.SQLITE_OK

    async def scenario() -> list[object]:
        queue = await _queue(db)
        await queue.enqueue(_image(0), PARAMS, input_name="before")
        await queue.read(lambda conn: conn.set_authorizer(no_commit))
        async with _writer_busy(queue):
            tasks = [
                asyncio.create_task(queue.enqueue(_image(i), PARAMS, input_name=f"{i}"))
                for i in range(1, 6)
            ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await queue.read(lambda conn: conn.set_authorizer(None))
        assert not queue.writer.in_transaction
        await queue.enqueue(_image(7), PARAMS, input_name="after")  # the writer still works
        await queue.close()
        return results

    results = run(scenario())
    assert all(isinstance(r, sqlite3.DatabaseError) for r in results), results
    assert db_rows(db, "SELECT input_name FROM jobs ORDER BY id") == [("before",), ("after",)]
    assert db_rows(db, "SELECT count(*) FROM images") == [(2,)]


def test_in_a_group_a_write_refused_for_space_is_disk_full_and_lands_nothing(
    tmp_path: Path,
) -> None:
    """SQLITE_FULL without filling a disk: the database may not grow past `max_page_count`.
    Each caller's answer matches what is on disk, whichever way SQLite ends the statement."""
    db = tmp_path / "aip.db"

    async def scenario() -> list[object]:
        queue = await _queue(db)
        await queue.enqueue(_image(0), PARAMS, input_name="0")
        await queue.read(
            lambda conn: conn.execute(
                "PRAGMA max_page_count = {}".format(
                    conn.execute("PRAGMA page_count").fetchone()[0] + 3
                )
            )
        )
        async with _writer_busy(queue):
            tasks = [
                asyncio.create_task(
                    queue.enqueue(
                        _image(i), {"prompt": "x" * (20_000 if i % 3 == 0 else 10)},
                        input_name=str(i),
                    )
                )
                for i in range(1, 10)
            ]  # fmt: skip
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert not queue.writer.in_transaction
        await queue.close()
        return results

    results = run(scenario())
    assert all(isinstance(r, DiskFull) for r in results[2::3])  # the large ones
    landed = {str(i) for i, r in enumerate(results, start=1) if isinstance(r, tuple)}
    assert landed and all(isinstance(r, (tuple, DiskFull)) for r in results)
    assert {row[0] for row in db_rows(db, "SELECT input_name FROM jobs")} == {"0"} | landed
    assert db_rows(db, "SELECT count(*) FROM images") == [(1 + len(landed),)]
