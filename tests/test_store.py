"""The store on a real SQLite file: migrations, pragmas, and the writer's group commit seen
through sqlite3's own hooks (the queue's state machine, on both backends: test_queue_contract)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path

import pytest

from service.errors import DiskFull
from service.store.db import Db
from service.store.migrate import load_migrations, migrate, schema_version, split_statements
from service.store.queue import ImageRecord, Queue
from service.store.tables import (
    AttemptRow,
    DetectionRow,
    ImageRow,
    InboxFileRow,
    JobRow,
    ResultRow,
)
from tests.conftest import db_rows
from tests.test_queue_contract import _enqueued_together, _image, _writer_busy

IMAGE = ImageRecord(
    sha256="ab" * 32, bytes=10, width=100, height=50, format="JPEG", path="images/ab/x.jpg"
)
PARAMS = {"queries": ["car"], "prompt": "what?", "options": {}}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def _sqlite(db: Db) -> sqlite3.Connection:
    """The writer's connection, for sqlite3's own hooks."""
    assert isinstance(db, sqlite3.Connection)
    return db


async def _queue(db: Path) -> Queue:
    migrate(db)
    return await Queue.open(db)


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


# -- group commit: concurrent intake shares one transaction and one COMMIT -----------------------


def test_concurrent_enqueues_share_commits_and_all_survive_a_reopen(tmp_path: Path) -> None:
    db, n = tmp_path / "aip.db", 50

    async def scenario() -> tuple[list[tuple[int, bool]], int]:
        queue = await _queue(db)
        commits: list[str] = []
        await queue.read(
            lambda conn: _sqlite(conn).set_trace_callback(
                lambda sql: commits.append(sql) if sql == "COMMIT" else None
            )
        )
        results = await _enqueued_together(queue, n)
        await queue.close()
        return results, len(commits)

    results, commits = run(scenario())
    assert all(created for _, created in results)
    ids = [job_id for job_id, _ in results]
    assert len(set(ids)) == n
    assert 1 <= commits < n  # behaviour, not timing: they shared commits
    assert sorted(int(str(row[0])) for row in db_rows(db, "SELECT id FROM jobs")) == sorted(ids)
    assert db_rows(db, "SELECT count(*) FROM images") == [(n,)]


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

        await queue.read(lambda conn: _sqlite(conn).set_trace_callback(trace))
        task = asyncio.create_task(queue.enqueue(_image(9), PARAMS, input_name="9"))
        assert await asyncio.to_thread(inside.wait, 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        go_on.set()
        await queue.read(lambda conn: _sqlite(conn).set_trace_callback(None))
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
        await queue.read(lambda conn: _sqlite(conn).set_authorizer(no_commit))
        async with _writer_busy(queue):
            tasks = [
                asyncio.create_task(queue.enqueue(_image(i), PARAMS, input_name=f"{i}"))
                for i in range(1, 6)
            ]
        results: list[object] = await asyncio.gather(*tasks, return_exceptions=True)
        await queue.read(lambda conn: _sqlite(conn).set_authorizer(None))
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
        results: list[object] = await asyncio.gather(*tasks, return_exceptions=True)
        assert not queue.writer.in_transaction
        await queue.close()
        return results

    results = run(scenario())
    assert all(isinstance(r, DiskFull) for r in results[2::3])  # the large ones
    landed = {str(i) for i, r in enumerate(results, start=1) if isinstance(r, tuple)}
    assert landed and all(isinstance(r, (tuple, DiskFull)) for r in results)
    assert {row[0] for row in db_rows(db, "SELECT input_name FROM jobs")} == {"0"} | landed
    assert db_rows(db, "SELECT count(*) FROM images") == [(1 + len(landed),)]
