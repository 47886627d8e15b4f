"""The inbox ledger: every file seen in the inbox and what became of it. One inbox job per
content is enforced here, in the database, in the same transaction that queues the job.

A file processed again on purpose (`reprocess`) is stored as a `duplicate` row that holds its
own job; only a plain duplicate points at the job that claimed the content (the `queued` row)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from service.store.db import Db
from service.store.dialect import distinct_from_sql
from service.store.queue import ImageRecord, Queue


@dataclass(frozen=True)
class FileSeen:
    """A file as the watcher found it."""

    relative_path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Entry:
    id: int
    outcome: str  # queued | duplicate | reprocessed | rejected (| pruned, from retention)
    job_id: int | None
    filed_to: str | None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class Filing:
    """One ledger row as the inbox's recent history shows it."""

    path: str
    outcome: str
    job_id: int | None
    code: str | None
    message: str | None
    at: float  # Unix seconds the file was handled


def _entry_columns(dialect: str) -> str:
    """An entry's columns: a duplicate row holding a job other than the content's claim was
    processed again on purpose."""
    return (
        f"f.id, CASE WHEN f.outcome = 'duplicate' AND f.job_id {distinct_from_sql(dialect)}"
        " (SELECT c.job_id FROM inbox_files c WHERE c.sha256 = f.sha256"
        " AND c.outcome = 'queued') THEN 'reprocessed' ELSE f.outcome END,"
        " f.job_id, f.filed_to, f.error_code, f.error_message"
    )


class Ledger:
    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._columns = _entry_columns(queue.dialect)

    async def known(self, file: FileSeen) -> Entry | None:
        """This very file (same path, size and mtime) was handled before but not filed away:
        moving is off, or the service stopped between queueing and filing."""
        row = await self._queue.read(
            lambda db: db.execute(
                f"SELECT {self._columns} FROM inbox_files f WHERE f.relative_path = ?"
                " AND f.size = ? AND f.mtime_ns = ? AND f.filed_to IS NULL"
                " ORDER BY f.id DESC LIMIT 1",
                (file.relative_path, file.size, file.mtime_ns),
            ).fetchone()
        )
        return None if row is None else Entry(*row)

    async def unfiled(self) -> list[tuple[Entry, FileSeen]]:
        """Every row whose file was never recorded as filed away, oldest first."""
        rows = await self._queue.read(
            lambda db: db.execute(
                f"SELECT {self._columns}, f.relative_path, f.size, f.mtime_ns"
                " FROM inbox_files f WHERE f.filed_to IS NULL ORDER BY f.id"
            ).fetchall()
        )
        return [(Entry(*row[:6]), FileSeen(*row[6:])) for row in rows]

    async def recent(self, limit: int = 20) -> list[Filing]:
        """The last `limit` files handled, newest first, with a rejection's reason."""
        rows = await self._queue.read(
            lambda db: db.execute(
                f"SELECT f.relative_path, {self._columns}, f.seen_at FROM inbox_files f"
                " ORDER BY f.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [Filing(row[0], row[2], row[3], row[5], row[6], row[7]) for row in rows]

    async def filed_paths(self) -> set[str]:
        rows = await self._queue.read(
            lambda db: db.execute(
                "SELECT filed_to FROM inbox_files WHERE filed_to IS NOT NULL"
            ).fetchall()
        )
        return {row[0] for row in rows}

    async def accept(
        self,
        file: FileSeen,
        image: ImageRecord,
        params: dict[str, Any],
        *,
        max_attempts: int,
        reprocess: bool = False,
        filed_to: str | None = None,
    ) -> Entry:
        """Queue a job for this content, or record the file as a duplicate of the job that
        already has it (with `reprocess`, queue a new job for it all the same); one
        transaction either way (shared with other intake arriving at the same moment, as
        `Queue.enqueue`). `filed_to` records a file that stays where it is."""
        queue = self._queue

        def accept(db: Db) -> Entry:
            row = db.execute(
                "SELECT job_id FROM inbox_files WHERE sha256 = ? AND outcome = 'queued'",
                (image.sha256,),
            ).fetchone()
            if row is not None and not reprocess:
                outcome, job_id = "duplicate", int(row[0])
            else:
                outcome = "queued" if row is None else "duplicate"
                job_id = queue.insert_job(
                    db,
                    image,
                    params,
                    input_name=file.relative_path.rsplit("/", 1)[-1],
                    source="inbox",
                    source_path=file.relative_path,
                    max_attempts=max_attempts,
                )
            entry_id = db.execute(
                "INSERT INTO inbox_files (relative_path, sha256, size, mtime_ns, outcome, job_id,"
                " filed_to, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    file.relative_path,
                    image.sha256,
                    file.size,
                    file.mtime_ns,
                    outcome,
                    job_id,
                    filed_to,
                    time.time(),
                ),
            ).fetchone()[0]
            if reprocess and row is not None:
                outcome = "reprocessed"
            return Entry(int(entry_id), outcome, job_id, filed_to)

        return await queue.write(accept, group=True)

    async def reject(self, file: FileSeen, code: str, message: str) -> Entry:
        def reject(db: Db) -> Entry:
            entry_id = db.execute(
                "INSERT INTO inbox_files (relative_path, size, mtime_ns, outcome,"
                " error_code, error_message, seen_at) VALUES (?, ?, ?, 'rejected', ?, ?, ?)"
                " RETURNING id",
                (file.relative_path, file.size, file.mtime_ns, code, message, time.time()),
            ).fetchone()[0]
            return Entry(int(entry_id), "rejected", None, None, code, message)

        return await self._queue.write(reject)

    async def filed(self, entry: Entry, filed_to: str) -> None:
        def filed(db: Db) -> None:
            db.execute("UPDATE inbox_files SET filed_to = ? WHERE id = ?", (filed_to, entry.id))

        await self._queue.write(filed)
