"""Copies a SQLite data directory (its rows and stored files) into a PostgreSQL store, keeping
ids, resumable after an interruption, and verified afterwards; prints nothing itself."""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg

from service.atomic import write_atomically
from service.store.backend import shown
from service.store.migrate import migrate as migrate_sqlite

BATCH = 500
# Parents before children, so every foreign key finds its row; a table not named here (added
# by a later migration) follows these, in name order.
ORDER = (
    "images",
    "jobs",
    "results",
    "detections",
    "job_attempts",
    "followups",
    "inbox_files",
    "profiles",
    "webhook_deliveries",
)
# Not copied: the migration ledger (each store keeps its own), full text (PostgreSQL's triggers
# fill job_search as jobs, results and follow-ups land) and the nodes of a running fleet.
SKIPPED = ("schema_migrations", "nodes", "sqlite_sequence")


class CopyRefused(Exception):
    """The copy cannot start; nothing was written to the target. Its text is one line."""


@dataclass
class TableCheck:
    name: str
    source_rows: int
    target_rows: int
    source_hash: str
    target_hash: str

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows and self.source_hash == self.target_hash


@dataclass
class Report:
    tables: list[TableCheck] = field(default_factory=list)
    files: int = 0  # stored files checked
    bad_files: list[str] = field(default_factory=list)  # differ from their source or sha256
    missing_files: list[str] = field(default_factory=list)  # absent from the source already
    unsearchable: int = 0  # results whose reasoning the full-text row lacks

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables) and not self.bad_files and not self.unsearchable


Progress = Callable[[str], None]
AfterBatch = Callable[[str, int], None]  # table, rows so far: a seam for tests


def tables(source: sqlite3.Connection) -> list[str]:
    """The SQLite tables to copy, parents first."""
    names = {
        str(row[0])
        for row in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not str(row[0]).startswith(("jobs_fts", "sqlite_")) and str(row[0]) not in SKIPPED
    }
    return [t for t in ORDER if t in names] + sorted(names - set(ORDER))


def _columns(source: sqlite3.Connection, table: str) -> tuple[list[str], list[str], list[str]]:
    """Columns, primary key columns (in key order) and those of them declared TEXT."""
    info = source.execute(f'PRAGMA table_info("{table}")').fetchall()
    columns = [str(c[1]) for c in info]
    key = [c for c in sorted(info, key=lambda c: c[5]) if c[5] > 0]
    if not key:
        raise RuntimeError(f"table {table} has no primary key: it cannot be copied resumably")
    return columns, [str(c[1]) for c in key], [str(c[1]) for c in key if "TEXT" in c[2].upper()]


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _rows(cursor: Any) -> Iterator[list[Any]]:
    while batch := cursor.fetchmany(BATCH):
        yield batch


def copy_rows(
    source: sqlite3.Connection,
    target: psycopg.Connection[Any],
    table: str,
    *,
    after_batch: AfterBatch | None = None,
) -> tuple[int, int]:
    """Every row of `table`, ids kept, in batches of BATCH rows, each its own transaction; a
    row already there (an earlier run) is left as it is. Returns (rows read, rows inserted)."""
    columns, key, _text = _columns(source, table)
    read = source.execute(f"SELECT {_quoted(columns)} FROM {table} ORDER BY {_quoted(key)}")
    insert = (
        f"INSERT INTO {table} ({_quoted(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
        " ON CONFLICT DO NOTHING"
    )
    seen = inserted = 0
    for batch in _rows(read):
        with target.transaction(), target.cursor() as cursor:
            for row in batch:
                cursor.execute(insert, tuple(row))
                inserted += cursor.rowcount
        seen += len(batch)
        if after_batch is not None:
            after_batch(table, seen)
    _advance_identity(source, target, table, key)
    return seen, inserted


def _advance_identity(
    source: sqlite3.Connection, target: psycopg.Connection[Any], table: str, key: list[str]
) -> None:
    """A generated id continues after the highest copied (or handed out: SQLite's
    AUTOINCREMENT never reuses an id of a deleted row, so neither may PostgreSQL)."""
    if len(key) != 1:
        return
    sequence = target.execute("SELECT pg_get_serial_sequence(%s, %s)", (table, key[0])).fetchone()
    if sequence is None or sequence[0] is None:
        return
    highest = 0
    has_sequence = source.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
    ).fetchone()
    if has_sequence:
        row = source.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        highest = int(row[0]) if row else 0
    row = target.execute(f'SELECT max("{key[0]}") FROM {table}').fetchone()
    highest = max(highest, int(row[0]) if row and row[0] is not None else 0)
    if highest:
        target.execute("SELECT setval(%s, %s)", (sequence[0], highest))


def _render(value: Any) -> str:
    """One value, written the same from either database: floats by repr (exact), text as
    JSON, so every row hashes the same wherever it was read."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return json.dumps(value)


def table_hash(rows: Iterator[Sequence[Any]]) -> tuple[int, str]:
    """Row count and sha256 over the rows, as given (ordered by primary key)."""
    digest = hashlib.sha256()
    count = 0
    for row in rows:
        digest.update(("[" + ",".join(_render(v) for v in row) + "]\n").encode())
        count += 1
    return count, digest.hexdigest()


def check_table(
    source: sqlite3.Connection, target: psycopg.Connection[Any], table: str
) -> TableCheck:
    columns, key, text = _columns(source, table)
    # SQLite orders text by its bytes; PostgreSQL by the database's collation unless told.
    order = ", ".join(f'"{k}" COLLATE "C"' if k in text else f'"{k}"' for k in key)
    select = f"SELECT {_quoted(columns)} FROM {table} ORDER BY "
    source_rows, source_hash = table_hash(iter(source.execute(select + _quoted(key))))
    with target.transaction(), target.cursor(name=f"aip_check_{table}") as cursor:
        cursor.itersize = BATCH
        cursor.execute(select + order)
        target_rows, target_hash = table_hash(iter(cursor))
    return TableCheck(table, source_rows, target_rows, source_hash, target_hash)


def _write(data: bytes, out: IO[bytes]) -> None:
    out.write(data)


def stored_paths(source: sqlite3.Connection) -> list[tuple[str, str | None]]:
    """The files rows refer to: (path, the sha256 its content must have, if known)."""
    images = source.execute(
        "SELECT path, sha256 FROM images WHERE pruned_at IS NULL ORDER BY path"
    ).fetchall()
    copies = source.execute(
        "SELECT redacted_path FROM results WHERE redacted_path IS NOT NULL ORDER BY redacted_path"
    ).fetchall()
    return [(str(p), str(s)) for p, s in images] + [(str(row[0]), None) for row in copies]


def copy_files(
    data_dir: Path,
    target: psycopg.Connection[Any],
    paths: list[tuple[str, str | None]],
    *,
    image_store: Path | None,
) -> tuple[int, list[str]]:
    """Each stored file not yet copied: into `stored_files`, or under `image_store`. Returns
    how many were copied and the paths missing from the data directory."""
    have = (
        {str(row[0]) for row in target.execute("SELECT path FROM stored_files")}
        if image_store is None
        else set()
    )
    copied, missing = 0, []
    for path, _sha in paths:
        source = data_dir / path
        if path in have or (image_store is not None and (image_store / path).is_file()):
            continue
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            missing.append(path)
            continue
        if image_store is not None:
            write_atomically(image_store / path, functools.partial(_write, data))
        else:
            target.execute(
                "INSERT INTO stored_files (path, data, bytes, sha256, created_at)"
                " VALUES (%s, %s, %s, %s, extract(epoch FROM clock_timestamp()))"
                " ON CONFLICT (path) DO NOTHING",
                (path, data, len(data), hashlib.sha256(data).hexdigest()),
            )
        copied += 1
    return copied, missing


def check_files(
    data_dir: Path,
    target: psycopg.Connection[Any],
    paths: list[tuple[str, str | None]],
    *,
    image_store: Path | None,
) -> tuple[list[str], list[str]]:
    """(Paths whose copy differs from what it must be, paths absent from the source.) An
    image must hash to its images.sha256; a redacted copy to its source file's sha256."""
    bad, missing = [], []
    for path, want in paths:
        source = data_dir / path
        if want is None:
            if not source.is_file():
                missing.append(path)
                continue
            want = hashlib.sha256(source.read_bytes()).hexdigest()
        if image_store is not None:
            copy = image_store / path
            got = hashlib.sha256(copy.read_bytes()).hexdigest() if copy.is_file() else None
        else:
            row = target.execute(
                "SELECT encode(sha256(data), 'hex') FROM stored_files WHERE path = %s", (path,)
            ).fetchone()
            got = None if row is None else str(row[0])
        if got is None and not source.is_file():
            missing.append(path)
        elif got != want:
            bad.append(path)
    return bad, missing


def connect(url: str) -> psycopg.Connection[Any]:
    """The target, in autocommit; CopyRefused when it cannot be reached (no such database,
    wrong password, server down), with the driver's reason on one line."""
    try:
        return psycopg.connect(url, autocommit=True)
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CopyRefused(f"cannot reach the database {shown(url)} ({reason})") from None


def foreign_jobs(source: sqlite3.Connection, target: psycopg.Connection[Any]) -> int:
    """Jobs in the target that are not this source's (same id, image and creation time): a
    database other nodes already use, or another data directory's copy. An earlier run of
    this copy leaves none."""
    if target.execute("SELECT to_regclass('jobs')").fetchone() == (None,):
        return 0
    ours = {
        row[0]: (row[1], row[2])
        for row in source.execute("SELECT id, image_sha256, created_at FROM jobs")
    }
    foreign = 0
    with target.transaction(), target.cursor(name="aip_foreign_jobs") as cursor:
        cursor.itersize = BATCH
        cursor.execute("SELECT id, image_sha256, created_at FROM jobs")
        for job_id, sha, created_at in cursor:
            foreign += ours.get(job_id) != (sha, created_at)
    return foreign


def _check_image_store(image_store: Path | None) -> None:
    # Not created here: a missing folder is most often a share that is not mounted, and
    # files written under the bare mount point would be hidden once it is.
    if image_store is None or image_store.is_dir():
        return
    if image_store.exists():
        raise CopyRefused(f"the image store {image_store} is not a folder")
    raise CopyRefused(f"the image store {image_store} does not exist (is the share mounted?)")


def unsearchable(target: psycopg.Connection[Any]) -> int:
    """Results whose reasoning did not reach the full-text row (the triggers fill it)."""
    row = target.execute(
        "SELECT count(*) FROM results LEFT JOIN job_search USING (job_id)"
        " WHERE job_search.reasoning IS DISTINCT FROM results.reasoning"
    ).fetchone()
    return int(row[0]) if row else 0


def copy_data_dir(
    database: Path,
    data_dir: Path,
    url: str,
    *,
    image_store: Path | None = None,
    progress: Progress = lambda line: None,
    after_batch: AfterBatch | None = None,
) -> Report:
    """Migrate both stores, copy every table's rows and the stored files, then verify. The
    caller holds the data directory (no service may write it meanwhile). CopyRefused, before
    anything is written to the target, when it cannot be reached, already holds jobs that are
    not this source's, or `image_store` is not an existing folder."""
    from service.store.postgres.migrate import migrate as migrate_postgres

    _check_image_store(image_store)
    migrate_sqlite(database)
    source = sqlite3.connect(database)
    try:
        with connect(url) as target:
            if foreign := foreign_jobs(source, target):
                raise CopyRefused(
                    f"the target already holds {foreign} jobs that did not come from this data "
                    "directory; copy into an empty database"
                )
            migrate_postgres(url)
            names = tables(source)
            for table in names:
                seen, inserted = copy_rows(source, target, table, after_batch=after_batch)
                progress(f"{table}: {seen} rows ({inserted} copied now)")
            paths = stored_paths(source)
            copied, _missing = copy_files(data_dir, target, paths, image_store=image_store)
            where = "stored_files" if image_store is None else str(image_store)
            progress(f"files: {len(paths)} ({copied} copied now, into {where})")
            report = Report([check_table(source, target, t) for t in names])
            report.files = len(paths)
            report.bad_files, report.missing_files = check_files(
                data_dir, target, paths, image_store=image_store
            )
            report.unsearchable = unsearchable(target)
            return report
    finally:
        source.close()


def summary(report: Report) -> list[str]:
    """The verification as a small table, one line per table, then the files."""
    width = max([len(t.name) for t in report.tables] + [5])
    lines = [f"{'table':<{width}}  {'sqlite':>8}  {'postgres':>8}  check"]
    for t in report.tables:
        verdict = "ok" if t.ok else ("rows differ" if t.source_hash != t.target_hash else "count")
        lines.append(f"{t.name:<{width}}  {t.source_rows:>8}  {t.target_rows:>8}  {verdict}")
    lines.append(
        f"{'files':<{width}}  {report.files:>8}  {report.files - len(report.bad_files):>8}  "
        + ("ok" if not report.bad_files else f"{len(report.bad_files)} differ")
    )
    for path in report.bad_files[:10]:
        lines.append(f"  differs: {path}")
    for path in report.missing_files[:10]:
        lines.append(f"  not in the data directory (nothing to copy): {path}")
    if report.unsearchable:
        lines.append(f"full text: {report.unsearchable} results not searchable")
    return lines
