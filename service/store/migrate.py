"""Applies the numbered SQL files in `migrations/` in order, each in one transaction, recorded."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """The installed copy inside the package, else the checkout's top-level folder."""
    packaged = Path(__file__).resolve().parents[1] / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or migrations_dir()
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise RuntimeError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number in {folder}")
    return found


def split_statements(sql: str) -> list[str]:
    """Split a script into statements; sqlite3 decides where one ends (triggers included)."""
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in current.splitlines()
    ):
        raise RuntimeError(f"unterminated SQL statement: {current.strip()[:80]}")
    return statements


def to_apply(
    migrations: list[Migration], applied: dict[int, str], upto: int | None, where: str
) -> list[Migration]:
    """The migrations not applied yet (up to `upto`), in order. One applied before whose file
    has since changed stops start-up: landed migrations are never edited, only followed."""
    pending = []
    for migration in migrations:
        if upto is not None and migration.version > upto:
            break
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                raise RuntimeError(
                    f"migration {migration.name} changed after it was applied to {where}; "
                    "add a new migration instead of editing a landed one"
                )
            continue
        pending.append(migration)
    return pending


def migrate(db_path: Path, upto: int | None = None, folder: Path | None = None) -> list[int]:
    """Bring the database at `db_path` up to date; returns the versions applied now.

    A migration that was applied before and whose file has since changed stops start-up:
    landed migrations are never edited, only followed by new ones.
    """
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " checksum TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        applied = {
            row[0]: row[1]
            for row in conn.execute("SELECT version, checksum FROM schema_migrations")
        }
        done = []
        for migration in to_apply(load_migrations(folder), applied, upto, str(db_path)):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                    (migration.version, migration.name, migration.checksum, time.time()),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            done.append(migration.version)
        return done
    finally:
        conn.close()


def schema_version(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)
    finally:
        conn.close()
