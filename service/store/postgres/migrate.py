"""Applies the numbered SQL files in `migrations/postgres/` in order, each in one transaction,
recorded, under an advisory lock so nodes starting together apply each one once."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

from service.store.migrate import load_migrations, migrations_dir, to_apply

# Session-level advisory lock held for a whole run: "aip_migr" in ASCII. Any fixed key works,
# as long as every node uses the same one and nothing else in the database takes it.
MIGRATION_LOCK = 0x6169705F6D696772


def postgres_migrations_dir() -> Path:
    return migrations_dir() / "postgres"


def migrate(url: str, upto: int | None = None, folder: Path | None = None) -> list[int]:
    """Bring the database at `url` up to date; returns the versions applied now.

    A second node that starts meanwhile waits on the lock, then finds everything applied.
    A migration that was applied before and whose file has since changed stops start-up:
    landed migrations are never edited, only followed by new ones.
    """
    migrations = load_migrations(folder or postgres_migrations_dir())
    with psycopg.connect(url, autocommit=True) as conn:
        # Released when the connection closes, whatever ends the run.
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version bigint PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at double precision NOT NULL)"
        )
        applied: dict[int, str] = dict(
            conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
        )
        done = []
        for migration in to_apply(migrations, applied, upto, _where(conn)):
            with conn.transaction():
                # No parameters: psycopg sends the file as one simple query, so it may
                # hold many statements and $$-quoted function bodies.
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (%s, %s, %s, %s)",
                    (migration.version, migration.name, migration.checksum, time.time()),
                )
            done.append(migration.version)
        return done


def schema_version(url: str) -> int:
    """The highest applied migration; 0 for a database never migrated."""
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,):
            return 0
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0) if row else 0


def _where(conn: psycopg.Connection) -> str:
    """The database named without its password, for messages."""
    info = conn.info
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"
