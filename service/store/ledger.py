"""The inbox ledger: every file seen in the inbox and what became of it. One inbox job per
content is enforced here, in the database, in the same transaction that queues the job."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

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
    outcome: str  # queued | duplicate | rejected
    job_id: int | None
    filed_to: str | None
    error_code: str | None = None
    error_message: str | None = None


class Ledger:
    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    async def known(self, file: FileSeen) -> Entry | None:
        """This very file (same path, size and mtime) was handled before but not filed away:
        moving is off, or the service stopped between queueing and filing."""
        async with self._queue.reading() as db:
            cursor = await db.execute(
                "SELECT id, outcome, job_id, filed_to, error_code, error_message FROM inbox_files"
                " WHERE relative_path = ?"
                " AND size = ? AND mtime_ns = ? AND filed_to IS NULL ORDER BY id DESC LIMIT 1",
                (file.relative_path, file.size, file.mtime_ns),
            )
            row = await cursor.fetchone()
        return None if row is None else Entry(*row)

    async def accept(
        self, file: FileSeen, image: ImageRecord, params: dict[str, Any], *, max_attempts: int
    ) -> Entry:
        """Queue a job for this content, or record the file as a duplicate of the job that
        already has it; one transaction either way."""
        queue = self._queue
        async with queue.transaction() as db:
            cursor = await db.execute(
                "SELECT job_id FROM inbox_files WHERE sha256 = ? AND outcome = 'queued'",
                (image.sha256,),
            )
            row = await cursor.fetchone()
            if row is not None:
                outcome, job_id = "duplicate", int(row[0])
            else:
                outcome = "queued"
                job_id = await queue.insert_job(
                    db,
                    image,
                    params,
                    input_name=file.relative_path.rsplit("/", 1)[-1],
                    source="inbox",
                    source_path=file.relative_path,
                    max_attempts=max_attempts,
                )
            cursor = await db.execute(
                "INSERT INTO inbox_files (relative_path, sha256, size, mtime_ns, outcome, job_id,"
                " seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    file.relative_path,
                    image.sha256,
                    file.size,
                    file.mtime_ns,
                    outcome,
                    job_id,
                    time.time(),
                ),
            )
            assert cursor.lastrowid is not None
            return Entry(cursor.lastrowid, outcome, job_id, None)

    async def reject(self, file: FileSeen, code: str, message: str) -> Entry:
        async with self._queue.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO inbox_files (relative_path, size, mtime_ns, outcome,"
                " error_code, error_message, seen_at) VALUES (?, ?, ?, 'rejected', ?, ?, ?)",
                (file.relative_path, file.size, file.mtime_ns, code, message, time.time()),
            )
            assert cursor.lastrowid is not None
            return Entry(cursor.lastrowid, "rejected", None, None, code, message)

    async def filed(self, entry: Entry, filed_to: str) -> None:
        async with self._queue.transaction() as db:
            await db.execute(
                "UPDATE inbox_files SET filed_to = ? WHERE id = ?", (filed_to, entry.id)
            )
