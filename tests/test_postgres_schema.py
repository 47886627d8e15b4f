"""The PostgreSQL schema on a real server: migrations (locked, recorded, checksummed), and the
triggers that keep full-text search and webhook deliveries, driven with plain SQL."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from service.store.migrate import load_migrations, migrations_dir
from service.store.postgres.migrate import migrate, postgres_migrations_dir, schema_version


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def _job(conn: psycopg.Connection[Any], params: dict[str, Any]) -> int:
    conn.execute(
        "INSERT INTO images (sha256, bytes, width, height, format, path, created_at)"
        " VALUES ('ab', 3, 4, 5, 'PNG', 'images/ab.png', 1.0) ON CONFLICT DO NOTHING"
    )
    row = conn.execute(
        "INSERT INTO jobs (image_sha256, input_name, params, run_after, created_at)"
        " VALUES ('ab', 'a.png', %s, 1.0, 1.0) RETURNING id",
        (json.dumps(params),),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _search(conn: psycopg.Connection[Any], word: str) -> list[int]:
    rows = conn.execute(
        "SELECT job_id FROM job_search WHERE document @@ to_tsquery('aip_search', %s)"
        " ORDER BY job_id",
        (f"{word}:*",),
    ).fetchall()
    return [row[0] for row in rows]


def test_the_sqlite_loader_does_not_read_the_postgres_folder() -> None:
    assert postgres_migrations_dir() == migrations_dir() / "postgres"
    sqlite_names = {m.name for m in load_migrations()}
    postgres_names = {m.name for m in load_migrations(postgres_migrations_dir())}
    assert "0001_schema" in postgres_names and not sqlite_names & postgres_names


def test_migrate_applies_all_then_none(pg_empty_url: str) -> None:
    latest = max(m.version for m in load_migrations(postgres_migrations_dir()))
    assert schema_version(pg_empty_url) == 0
    assert migrate(pg_empty_url)[-1] == latest
    assert schema_version(pg_empty_url) == latest
    assert migrate(pg_empty_url) == []


def test_two_nodes_migrating_together_apply_each_version_once(pg_empty_url: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def node() -> None:
        try:
            start.wait()
            results.append(migrate(pg_empty_url))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=node) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    versions = [m.version for m in load_migrations(postgres_migrations_dir())]
    assert sorted(results, key=len) == [[], versions]
    with _connect(pg_empty_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [row[0] for row in rows] == versions


def test_an_edited_landed_migration_is_refused(pg_empty_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x bigint);\n")
    assert migrate(pg_empty_url, folder=tmp_path) == [1]
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x bigint, y text);\n")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        migrate(pg_empty_url, folder=tmp_path)


def test_a_failing_migration_leaves_nothing_half_applied(pg_empty_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x bigint);\nCREATE TABLE a (y text);\n")
    with pytest.raises(psycopg.errors.DuplicateTable):
        migrate(pg_empty_url, folder=tmp_path)
    with _connect(pg_empty_url) as conn:
        assert conn.execute("SELECT to_regclass('a')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (0,)


def test_upto_stops_at_the_version_given(pg_empty_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x bigint);\n")
    (tmp_path / "0002_b.sql").write_text("CREATE TABLE b (x bigint);\n")
    assert migrate(pg_empty_url, upto=1, folder=tmp_path) == [1]
    assert migrate(pg_empty_url, folder=tmp_path) == [2]


def test_full_text_follows_jobs_results_and_followups(pg_url: str) -> None:
    with _connect(pg_url) as conn:
        job = _job(conn, {"queries": ["car"], "prompt": "count the tractors"})
        other = _job(conn, {"queries": ["car"]})
        assert _search(conn, "tract") == [job]

        conn.execute(
            "INSERT INTO results (job_id, reasoning, created_at) VALUES (%s, %s, 2.0)",
            (job, "two harvesters beside a barn"),
        )
        assert _search(conn, "harvest") == [job]

        conn.execute(
            "INSERT INTO followups (job_id, n, question, max_tokens, created_at)"
            " VALUES (%s, 1, 'which silo is nearest', 32, 3.0)",
            (job,),
        )
        assert _search(conn, "silo") == [job]
        conn.execute(
            "UPDATE followups SET answer = 'the northern granary', status = 'succeeded'"
            " WHERE job_id = %s AND n = 1",
            (job,),
        )
        conn.execute(
            "INSERT INTO followups (job_id, n, question, max_tokens, created_at)"
            " VALUES (%s, 2, 'any fences', 32, 4.0)",
            (job,),
        )
        row = conn.execute("SELECT followups FROM job_search WHERE job_id = %s", (job,))
        assert row.fetchone() == ("which silo is nearest the northern granary any fences ",)
        assert _search(conn, "granar") == [job]

        conn.execute("DELETE FROM results WHERE job_id = %s", (job,))
        assert _search(conn, "harvest") == []
        assert conn.execute(
            "SELECT prompt FROM job_search WHERE job_id = %s", (other,)
        ).fetchone() == ("",)

        conn.execute("DELETE FROM jobs WHERE id = %s", (job,))
        assert conn.execute("SELECT job_id FROM job_search").fetchall() == [(other,)]


def test_webhook_delivery_written_when_a_job_with_a_url_finishes(pg_url: str) -> None:
    with _connect(pg_url) as conn:
        hooked = _job(conn, {"queries": ["car"], "webhook": "http://x"})
        plain = _job(conn, {"queries": ["car"]})
        conn.execute("UPDATE jobs SET status = 'succeeded' WHERE id IN (%s, %s)", (hooked, plain))
        rows = conn.execute(
            "SELECT id, job_id, event, url, status, attempts, created_at, next_attempt_at"
            " FROM webhook_deliveries"
        ).fetchall()
        assert len(rows) == 1
        delivery, job_id, event, url, status, attempts, created, due = rows[0]
        assert (job_id, event, url, status, attempts) == (
            hooked,
            "job.succeeded",
            "http://x",
            "pending",
            0,
        )
        assert len(delivery) == 32 and int(delivery, 16) >= 0
        now = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        assert now is not None and 0 < created <= now[0] and due == created

        # Ending an already-ended job again writes no second delivery.
        conn.execute("UPDATE jobs SET status = 'failed' WHERE id = %s", (hooked,))
        count = conn.execute("SELECT count(*) FROM webhook_deliveries").fetchone()
        assert count == (1,)


def test_nodes_and_stored_files_tables(pg_url: str) -> None:
    with _connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO nodes (id, host, pid, role, started_at, heartbeat_at)"
            " VALUES ('n1', 'mac', 42, 'worker', 1.0, 1.0)"
        )
        assert conn.execute("SELECT jobs_done, stopped_at FROM nodes").fetchone() == (0, None)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO nodes (id, host, pid, role, started_at, heartbeat_at)"
                " VALUES ('n2', 'mac', 43, 'boss', 1.0, 1.0)"
            )
        conn.execute(
            "INSERT INTO stored_files VALUES ('images/ab.png', %s, 3, 'h', 1.0)", (b"\x00\x01\x02",)
        )
        assert conn.execute("SELECT data FROM stored_files").fetchone() == (b"\x00\x01\x02",)
