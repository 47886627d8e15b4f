"""The job state machine: the only code that changes a job's status, lease or result.

    queued -> running -> succeeded | failed | cancelled
    running -> queued            (transient failure with attempts left, lost lease, release)
    failed | cancelled -> queued (explicit retry)

Every transition is one statement or one transaction on the single writer connection; a
running job's transitions are fenced by (owner, attempt) so a worker that lost its lease
can never overwrite what a newer attempt wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from service.detection import Detection
from service.errors import Conflict, JobFailure, NotFound
from service.store.sqlite import open_writer

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class ImageRecord:
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
    path: str  # relative to the data directory
    exif: dict[str, Any] | None = None

    @property
    def captured_at(self) -> str | None:
        """EXIF `YYYY:MM:DD HH:MM:SS` as ISO 8601 (the camera's local time)."""
        raw = (self.exif or {}).get("captured_at")
        if not isinstance(raw, str) or len(raw) < 19 or raw[4] != ":" or raw[7] != ":":
            return None
        return f"{raw[0:4]}-{raw[5:7]}-{raw[8:10]}T{raw[11:19]}"


@dataclass(frozen=True)
class Claim:
    """A running attempt, owned by one worker until its lease expires."""

    job_id: int
    attempt: int
    owner: str
    image_sha256: str
    image_path: str
    params: dict[str, Any]
    created_at: float
    started_at: float


@dataclass(frozen=True)
class Outcome:
    detections: Sequence[Detection]
    reasoning: str
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Heartbeat:
    owned: bool
    cancel_requested: bool


class Queue:
    def __init__(self, conn: aiosqlite.Connection, *, clock: Callable[[], float] = time.time):
        self._conn = conn
        self._lock = asyncio.Lock()
        self._clock = clock

    @classmethod
    async def open(cls, db_path: Path, *, clock: Callable[[], float] = time.time) -> Queue:
        return cls(await open_writer(db_path), clock=clock)

    async def close(self) -> None:
        await self._conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction on the writer connection (BEGIN IMMEDIATE ... COMMIT)."""
        async with self._lock:
            # BEGIN and COMMIT run to completion even when the caller is cancelled meanwhile,
            # so the connection is never left inside a transaction nobody will end.
            begin = asyncio.ensure_future(self._conn.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
                yield self._conn
            except BaseException:
                await asyncio.shield(self._rollback(begin))
                raise
            await asyncio.shield(self._conn.execute("COMMIT"))

    async def _rollback(self, begin: asyncio.Future[Any]) -> None:
        with contextlib.suppress(Exception):
            await begin
        if self._conn.in_transaction:
            await self._conn.execute("ROLLBACK")

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """The writer connection for a read that must see the latest commits (no BEGIN)."""
        async with self._lock:
            yield self._conn

    # -- intake ---------------------------------------------------------------------------

    async def enqueue(
        self,
        image: ImageRecord,
        params: dict[str, Any],
        *,
        input_name: str,
        source: str = "api",
        max_attempts: int = 3,
        source_path: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[int, bool]:
        """Queue a job; returns (job id, created). An idempotency key seen before returns the
        original job when the request matches, and is a conflict when it does not."""
        async with self.transaction() as db:
            if idempotency_key is not None:
                cursor = await db.execute(
                    "SELECT id, request_hash FROM jobs WHERE idempotency_key = ?",
                    (idempotency_key,),
                )
                row = await cursor.fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise Conflict(
                            f"Idempotency-Key {idempotency_key!r} was used for job {row['id']} "
                            "with different parameters; use a new key for a new request",
                            code="idempotency_conflict",
                        )
                    return int(row["id"]), False
            job_id = await self.insert_job(
                db,
                image,
                params,
                input_name=input_name,
                source=source,
                source_path=source_path,
                max_attempts=max_attempts,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
            return job_id, True

    async def insert_job(
        self,
        db: aiosqlite.Connection,
        image: ImageRecord,
        params: dict[str, Any],
        *,
        input_name: str,
        source: str,
        max_attempts: int,
        source_path: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> int:
        """Insert a queued job (and its image, once) inside the caller's transaction."""
        now = self._clock()
        await db.execute(
            "INSERT INTO images (sha256, bytes, width, height, format, path, exif,"
            " created_at, captured_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            # The same bytes again: stored again too, if retention had removed the copy.
            " ON CONFLICT (sha256) DO UPDATE SET pruned_at = NULL, path = excluded.path",
            (
                image.sha256,
                image.bytes,
                image.width,
                image.height,
                image.format,
                image.path,
                json.dumps(image.exif) if image.exif else None,
                now,
                image.captured_at,
            ),
        )
        cursor = await db.execute(
            "INSERT INTO jobs (source, source_path, image_sha256, input_name, params,"
            " max_attempts, run_after, created_at, idempotency_key, request_hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                source,
                source_path,
                image.sha256,
                input_name,
                json.dumps(params),
                max_attempts,
                now,
                now,
                idempotency_key,
                request_hash,
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    # -- the worker's side ----------------------------------------------------------------

    async def claim(self, owner: str, lease_seconds: float) -> Claim | None:
        """Atomically take the oldest runnable queued job, or None."""
        async with self.transaction() as db:
            now = self._clock()  # read under the lock: a long wait must not shorten the lease
            cursor = await db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1,"
                " lease_owner = ?, lease_until = ?, started_at = coalesce(started_at, ?)"
                " WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND run_after <= ?"
                "             ORDER BY run_after, id LIMIT 1)"
                " RETURNING id, attempts, image_sha256, params, created_at, started_at",
                (owner, now + lease_seconds, now, now),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            image = await (
                await db.execute("SELECT path FROM images WHERE sha256 = ?", (row["image_sha256"],))
            ).fetchone()
            await db.execute(
                "INSERT INTO job_attempts (job_id, attempt, worker, started_at)"
                " VALUES (?, ?, ?, ?)",
                (row["id"], row["attempts"], owner, now),
            )
        return Claim(
            job_id=row["id"],
            attempt=row["attempts"],
            owner=owner,
            image_sha256=row["image_sha256"],
            image_path=image["path"] if image else "",
            params=json.loads(row["params"]),
            created_at=row["created_at"],
            started_at=now,
        )

    async def heartbeat(self, claim: Claim, lease_seconds: float) -> Heartbeat:
        async with self._lock:
            cursor = await self._conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running'"
                " AND lease_owner = ? AND attempts = ? RETURNING cancel_requested",
                (self._clock() + lease_seconds, claim.job_id, claim.owner, claim.attempt),
            )
            row = await cursor.fetchone()
        if row is None:
            return Heartbeat(owned=False, cancel_requested=False)
        return Heartbeat(owned=True, cancel_requested=bool(row["cancel_requested"]))

    async def _owns(self, db: aiosqlite.Connection, claim: Claim) -> bool:
        cursor = await db.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND lease_owner = ?"
            " AND attempts = ?",
            (claim.job_id, claim.owner, claim.attempt),
        )
        return await cursor.fetchone() is not None

    async def _end_attempt(
        self, db: aiosqlite.Connection, claim: Claim, outcome: str, error: JobFailure | None
    ) -> None:
        await db.execute(
            "UPDATE job_attempts SET finished_at = ?, outcome = ?, error_code = ?,"
            " error_message = ? WHERE job_id = ? AND attempt = ? AND worker = ?"
            " AND finished_at IS NULL",
            (
                self._clock(),
                outcome,
                error.code if error else None,
                error.message if error else None,
                claim.job_id,
                claim.attempt,
                claim.owner,
            ),
        )

    async def _honour_cancel(self, db: aiosqlite.Connection, job_id: int, now: float) -> bool:
        """A job sent back to the queue whose cancellation was requested meanwhile ends
        `cancelled` instead of running again."""
        cursor = await db.execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?, error_code = 'cancelled',"
            " error_message = 'cancelled while it was running' WHERE id = ?"
            " AND status = 'queued' AND cancel_requested = 1",
            (now, job_id),
        )
        return cursor.rowcount > 0

    async def complete(self, claim: Claim, outcome: Outcome) -> bool:
        """Write result, detections, timings and status in one transaction; False if fenced off."""
        async with self.transaction() as db:
            began = time.perf_counter()
            if not await self._owns(db, claim):
                return False
            now = self._clock()
            await db.execute(
                "INSERT INTO results (job_id, reasoning, created_at) VALUES (?, ?, ?)",
                (claim.job_id, outcome.reasoning, now),
            )
            await db.executemany(
                "INSERT INTO detections (job_id, idx, label, x1, y1, x2, y2, mask)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        claim.job_id,
                        number,
                        d.label,
                        *d.box,
                        json.dumps(d.mask) if d.mask is not None else None,
                    )
                    for number, d in enumerate(outcome.detections, start=1)
                ],
            )
            await self._end_attempt(db, claim, "succeeded", None)
            timings = {**outcome.timings, "persist": (time.perf_counter() - began) * 1000}
            await db.execute(
                "UPDATE jobs SET status = 'succeeded', finished_at = ?, lease_owner = NULL,"
                " lease_until = NULL, error_code = NULL, error_message = NULL, timings = ?,"
                " models = ? WHERE id = ?",
                (now, json.dumps(timings), json.dumps(outcome.models), claim.job_id),
            )
            return True

    async def fail(
        self,
        claim: Claim,
        failure: JobFailure,
        *,
        retry_in: float | None,
        timings: dict[str, float] | None = None,
        models: dict[str, Any] | None = None,
    ) -> str | None:
        """Record a failed attempt. With `retry_in` and attempts left the job is queued again
        after that delay; otherwise it ends `failed`. Returns the new status, None if fenced."""
        async with self.transaction() as db:
            if not await self._owns(db, claim):
                return None
            cursor = await db.execute(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ?", (claim.job_id,)
            )
            row = await cursor.fetchone()
            assert row is not None
            retry = retry_in is not None and row["attempts"] < row["max_attempts"]
            now = self._clock()
            await self._end_attempt(db, claim, "retrying" if retry else "failed", failure)
            await db.execute(
                "UPDATE jobs SET status = ?, run_after = ?, finished_at = ?, lease_owner = NULL,"
                " lease_until = NULL, error_code = ?, error_message = ?,"
                " timings = coalesce(?, timings), models = coalesce(?, models) WHERE id = ?",
                (
                    "queued" if retry else "failed",
                    now + (retry_in or 0.0) if retry else now,
                    None if retry else now,
                    failure.code,
                    failure.message,
                    json.dumps(timings) if timings else None,
                    json.dumps(models) if models else None,
                    claim.job_id,
                ),
            )
            if retry and await self._honour_cancel(db, claim.job_id, now):
                return "cancelled"
            return "queued" if retry else "failed"

    async def finish_cancelled(self, claim: Claim, reason: str) -> bool:
        async with self.transaction() as db:
            if not await self._owns(db, claim):
                return False
            failure = JobFailure("cancelled", reason, transient=False)
            await self._end_attempt(db, claim, "cancelled", failure)
            await db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, lease_owner = NULL,"
                " lease_until = NULL, error_code = ?, error_message = ? WHERE id = ?",
                (self._clock(), failure.code, failure.message, claim.job_id),
            )
            return True

    async def release(self, claim: Claim) -> bool:
        """Give a running job back (shutdown): queued again, the attempt not counted."""
        async with self.transaction() as db:
            if not await self._owns(db, claim):
                return False
            await self._end_attempt(db, claim, "released", None)
            now = self._clock()
            await db.execute(
                "UPDATE jobs SET status = 'queued', attempts = attempts - 1, run_after = ?,"
                " lease_owner = NULL, lease_until = NULL WHERE id = ?",
                (now, claim.job_id),
            )
            await self._honour_cancel(db, claim.job_id, now)
            return True

    async def recover(self, *, expired_only: bool) -> tuple[int, int]:
        """Running jobs whose worker is gone go back to the queue, or to `failed` once their
        attempts are used up (a job that kills its worker every time must not loop forever).
        At start-up every running job is orphaned (the data directory is locked to one
        process); later only expired leases are. Returns (requeued, failed)."""
        lease_filter = " AND lease_until < ?" if expired_only else ""
        async with self.transaction() as db:
            now = self._clock()
            args: tuple[Any, ...] = (now,) if expired_only else ()
            cursor = await db.execute(
                "SELECT id, attempts, max_attempts, lease_owner FROM jobs"
                " WHERE status = 'running'" + lease_filter,
                args,
            )
            rows = await cursor.fetchall()
            requeued = failed = 0
            for row in rows:
                lost = JobFailure(
                    "worker_lost",
                    f"the worker running attempt {row['attempts']} stopped without finishing "
                    "(crash, kill or power loss)",
                    transient=True,
                )
                give_up = row["attempts"] >= row["max_attempts"]
                await db.execute(
                    "UPDATE job_attempts SET finished_at = ?, outcome = 'lost', error_code = ?,"
                    " error_message = ? WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
                    (now, lost.code, lost.message, row["id"], row["attempts"]),
                )
                await db.execute(
                    "UPDATE jobs SET status = ?, run_after = ?, finished_at = ?,"
                    " lease_owner = NULL, lease_until = NULL, error_code = ?, error_message = ?"
                    " WHERE id = ?",
                    (
                        "failed" if give_up else "queued",
                        now,
                        now if give_up else None,
                        lost.code,
                        lost.message,
                        row["id"],
                    ),
                )
                await self._honour_cancel(db, row["id"], now)
                failed += give_up
                requeued += not give_up
        return requeued, failed

    # -- the user's side ------------------------------------------------------------------

    async def request_cancel(self, job_id: int) -> str:
        """Cancel a queued job now; ask a running one to stop at its next stage boundary."""
        async with self.transaction() as db:
            status = await self._status(db, job_id)
            if status == "queued":
                await db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?, error_code = ?,"
                    " error_message = ? WHERE id = ?",
                    (self._clock(), "cancelled", "cancelled before it started", job_id),
                )
                return "cancelled"
            if status == "running":
                await db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return "running"
            raise Conflict(f"job {job_id} is already {status}", code="job_finished")

    async def retry(self, job_id: int) -> None:
        """Queue a failed or cancelled job again with a fresh attempt budget."""
        async with self.transaction() as db:
            status = await self._status(db, job_id)
            if status not in ("failed", "cancelled"):
                raise Conflict(
                    f"job {job_id} is {status}; only failed or cancelled jobs can be retried",
                    code="job_not_retryable",
                )
            await db.execute(
                "UPDATE jobs SET status = 'queued', attempts = 0, run_after = ?,"
                " finished_at = NULL, cancel_requested = 0, error_code = NULL,"
                " error_message = NULL WHERE id = ?",
                (self._clock(), job_id),
            )

    async def _status(self, db: aiosqlite.Connection, job_id: int) -> str:
        cursor = await db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"job {job_id} does not exist", code="job_not_found")
        return str(row["status"])

    async def counts(self) -> dict[str, int]:
        async with self.reading() as db:
            cursor = await db.execute("SELECT status, count(*) AS n FROM jobs GROUP BY status")
            rows = await cursor.fetchall()
        found = {row["status"]: row["n"] for row in rows}
        return {status: int(found.get(status, 0)) for status in STATUSES}

    async def next_run_after(self) -> float | None:
        """When the earliest queued job becomes runnable (for the worker's sleep)."""
        async with self.reading() as db:
            cursor = await db.execute(
                "SELECT min(run_after) AS t FROM jobs WHERE status = 'queued'"
            )
            row = await cursor.fetchone()
        return None if row is None or row["t"] is None else float(row["t"])
