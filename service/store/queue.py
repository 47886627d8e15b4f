"""The job state machine: the only code that changes a job's status, lease or result.

    queued -> running -> succeeded | failed | cancelled
    running -> queued            (transient failure with attempts left, lost lease, release)
    failed | cancelled -> queued (explicit retry)

Every transition is one function run as one transaction on the writer thread (one hop from
the event loop; see store/writer.py); a running job's transitions are fenced by (owner,
attempt) so a worker that lost its lease can never overwrite what a newer attempt wrote.
A worker ending an attempt may claim its next job in the same transaction (`claim_next`):
one commit, one fsync, where ending and claiming apart would take two.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from service.detection import Detection
from service.diskspace import DiskState, is_disk_full, watch
from service.errors import Conflict, DiskFull, JobFailure, NotFound
from service.profiles import NO_PROFILE
from service.store.db import Db
from service.store.ground import ground_bounds, ground_size
from service.store.sqlite import connect_writer
from service.store.writer import Writer

T = TypeVar("T")

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
    # This attempt's place since the job was last queued by hand (a retry starts again at 1):
    # the backoff grows with it, not with the attempts of earlier rounds.
    round_attempt: int = 1
    # What the geometry of the frame reads (service/geo): its EXIF and its upright size.
    image_exif: dict[str, Any] | None = None
    image_size: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Outcome:
    detections: Sequence[Detection]
    reasoning: str
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    answer: Any = None  # the structured answer, when the job gave a response_schema
    citations: list[int] = field(default_factory=list)  # detection numbers the text cites
    planned_queries: list[str] | None = None  # what the reasoner proposed to look for
    tiling: dict[str, Any] | None = None  # tile grid and timings; None when not tiled
    redacted_path: str | None = None  # relative to the data directory
    # Where the frame and each detection are on the ground (service/geo/georef.py); None
    # for a job whose geometry was not worked out.
    geo: dict[str, Any] | None = None
    detection_geo: Sequence[dict[str, Any]] = ()


@dataclass(frozen=True)
class Heartbeat:
    owned: bool
    cancel_requested: bool


def _json_or_null(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


class ClaimNext(NamedTuple):
    """Who claims the next job in the transaction that ends an attempt, and for how long."""

    owner: str
    lease_seconds: float
    profiles: Sequence[str] = ()  # only jobs of these profiles (NO_PROFILE: none); (): any


WRITE_TRIES = 3  # a write aborted for another writer's sake is run at most this many times


class Queue:
    """The job state machine on SQLite (one writer connection; the process's clock)."""

    # The oldest runnable job, taken. Queued since: creation, or the last explicit retry (the
    # queue wait's start).
    _CLAIM = (
        "UPDATE jobs SET status = 'running', attempts = attempts + 1,"
        " lease_owner = ?, lease_until = ?, started_at = coalesce(started_at, ?)"
        " WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND run_after <= ?{only}"
        "             ORDER BY run_after, id LIMIT 1)"
        " RETURNING id, attempts, image_sha256, params,"
        " coalesce(queued_at, created_at) AS created_at, started_at,"
        " attempts - max_attempts + coalesce(attempt_budget, max_attempts)"
        " AS round_attempt"
    )
    # The profile a job's params name (absent or null: none), for a node limited to some.
    _PROFILE = "json_extract(params, '$.profile')"
    # Running jobs a recovery looks at.
    _RUNNING = "SELECT id, attempts, max_attempts, lease_owner FROM jobs WHERE status = 'running'"
    _LOCK_ROWS = ""  # the writer's transaction already excludes every other writer
    # A fenced or status-checked transition's read, holding the row until its write.
    _LOCK_ROW = ""
    # Whether every running job is orphaned when this process starts: true where the data
    # directory's lock makes this process the only one on the database.
    sole_owner = True
    dialect = "sqlite"  # its SQL's dialect (service/store/dialect.py)

    def __init__(
        self,
        writer: Writer,
        *,
        clock: Callable[[], float] = time.time,
        disk: DiskState | None = None,
    ):
        self.writer = writer
        self._clock = clock
        self.disk = disk or watch(Path.cwd())
        # Claims whose lease or hand-back could not be written (disk full): the database still
        # says `running`, so `recover` must leave them to this worker, and a hand-back not yet
        # written is written first thing once writes work again.
        self._offline: dict[int, Claim] = {}
        self._unreleased: dict[int, tuple[Claim, JobFailure | None]] = {}

    @classmethod
    async def open(cls, db_path: Path, *, clock: Callable[[], float] = time.time) -> Queue:
        conn = await asyncio.to_thread(connect_writer, db_path)
        return cls(Writer(conn), clock=clock, disk=watch(db_path.parent))

    async def close(self) -> None:
        await self.writer.close()

    async def write(self, fn: Callable[[Db], T], *, group: bool = False) -> T:
        """`fn(conn)` as one write transaction on the writer thread (BEGIN IMMEDIATE ...
        COMMIT; with `group`, possibly sharing its COMMIT with other group writes waiting at
        the same time). A write refused for want of space raises DiskFull (507), whether a
        statement or the COMMIT (where WAL frames are written) hit it; nothing of it is kept.
        A cancelled caller does not stop it: it lands whole or not at all. One the database
        aborted to break a deadlock with another writer is run again."""
        for tries_left in reversed(range(WRITE_TRIES)):
            try:
                return await self.writer.run(fn, group=group)
            except Exception as exc:
                if is_disk_full(exc) and not isinstance(exc, DiskFull):
                    raise self._disk_full() from exc
                if not (tries_left and self._aborted_for_another(exc)):
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _aborted_for_another(exc: Exception) -> bool:
        """Whether the database undid a write to let another writer's go through (never
        here: this process is the database's only writer)."""
        return False

    async def read(self, fn: Callable[[Db], T]) -> T:
        """`fn(conn)` on the writer connection, for a read that must see the latest commits."""
        return await self.writer.read(fn)

    def _now(self, db: Db) -> float:
        """The time that leases, run-after times and timestamps are written in."""
        return self._clock()

    def now(self, db: Db) -> float:
        """`_now` for store code outside the state machine (service/store/nodes.py)."""
        return self._now(db)

    def _disk_full(self) -> DiskFull:
        return self.disk.note_full("writing to the database")

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
        """Queue a job; returns (job id, created), once the commit that holds it is durable.
        An idempotency key seen before returns the original job when the request matches,
        and is a conflict when it does not. Enqueues arriving together share one commit."""

        def enqueue(db: Db) -> tuple[int, bool]:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT id, request_hash FROM jobs WHERE idempotency_key = ?",
                    (idempotency_key,),
                ).fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise Conflict(
                            f"Idempotency-Key {idempotency_key!r} was used for job {row['id']} "
                            "with different parameters; use a new key for a new request",
                            code="idempotency_conflict",
                        )
                    return int(row["id"]), False
            job_id = self.insert_job(
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

        try:
            return await self.write(enqueue, group=True)
        except Exception as exc:
            if idempotency_key is None or not self._duplicate_key(exc):
                raise
        # Another node inserted the same key in the meantime: its job is the answer now.
        return await self.write(enqueue, group=True)

    @staticmethod
    def _duplicate_key(exc: Exception) -> bool:
        """Whether a write failed on a unique key another writer took first (never here:
        this process is the database's only writer)."""
        return False

    def insert_job(
        self,
        db: Db,
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
        """Insert a queued job (and its image, once) inside the caller's transaction (on the
        writer thread)."""
        now = self._now(db)
        db.execute(
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
        row = db.execute(
            "INSERT INTO jobs (source, source_path, image_sha256, input_name, params,"
            " max_attempts, run_after, created_at, idempotency_key, request_hash, flight)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
                params.get("flight"),
            ),
        ).fetchone()
        return int(row["id"])

    # -- the worker's side ----------------------------------------------------------------

    async def claim(
        self, owner: str, lease_seconds: float, *, profiles: Sequence[str] = ()
    ) -> Claim | None:
        """Atomically take the oldest runnable queued job, or None. Order is by `run_after`,
        which a job handed back or interrupted keeps: it runs before anything newer. With
        `profiles`, only a job of one of them (NO_PROFILE: a job without one). It may share
        its commit with intake writes waiting at the same time."""
        await self._write_hand_backs()
        return await self.write(
            lambda db: self._claim(db, owner, lease_seconds, profiles), group=True
        )

    async def claim_many(
        self, owner: str, lease_seconds: float, limit: int, *, profiles: Sequence[str] = ()
    ) -> list[Claim]:
        """Up to `limit` runnable queued jobs, oldest first, taken in one transaction (each
        claimed as `claim` takes one: its own attempt, lease and fence)."""
        if limit < 1:
            raise ValueError("claim at least one job")
        await self._write_hand_backs()

        def claim_up_to(db: Db) -> list[Claim]:
            claims: list[Claim] = []
            while len(claims) < limit:
                claim = self._claim(db, owner, lease_seconds, profiles)
                if claim is None:
                    break
                claims.append(claim)
            return claims

        return await self.write(claim_up_to, group=True)

    def _claim(
        self, db: Db, owner: str, lease_seconds: float, profiles: Sequence[str] = ()
    ) -> Claim | None:
        now = self._now(db)  # read in the transaction: a long wait must not shorten the lease
        only = ""
        if profiles:
            only = f" AND coalesce({self._PROFILE}, ?) IN ({', '.join('?' * len(profiles))})"
        row = db.execute(
            self._CLAIM.format(only=only),
            (owner, now + lease_seconds, now, now, *((NO_PROFILE, *profiles) if profiles else ())),
        ).fetchone()
        if row is None:
            return None
        image = db.execute(
            "SELECT path, exif, width, height FROM images WHERE sha256 = ?",
            (row["image_sha256"],),
        ).fetchone()
        db.execute(
            "INSERT INTO job_attempts (job_id, attempt, worker, started_at) VALUES (?, ?, ?, ?)",
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
            round_attempt=row["round_attempt"],
            image_exif=json.loads(image["exif"]) if image and image["exif"] else None,
            image_size=(image["width"], image["height"]) if image else (0, 0),
        )

    async def heartbeat(self, claim: Claim, lease_seconds: float) -> Heartbeat:
        """Extend the lease. On a full disk it raises DiskFull, and until a beat gets through
        `recover` leaves the job to its worker instead of calling it lost."""

        def beat(db: Db) -> Any:
            row: Any = db.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running'"
                " AND lease_owner = ? AND attempts = ? RETURNING cancel_requested",
                (self._now(db) + lease_seconds, claim.job_id, claim.owner, claim.attempt),
            ).fetchone()
            return row

        try:
            row = await self.write(beat)
        except DiskFull:
            self._offline[claim.job_id] = claim
            raise
        self._offline.pop(claim.job_id, None)
        if row is None:
            return Heartbeat(owned=False, cancel_requested=False)
        return Heartbeat(owned=True, cancel_requested=bool(row["cancel_requested"]))

    @classmethod
    def _owns(cls, db: Db, claim: Claim) -> bool:
        return (
            db.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND lease_owner = ?"
                " AND attempts = ?" + cls._LOCK_ROW,
                (claim.job_id, claim.owner, claim.attempt),
            ).fetchone()
            is not None
        )

    def _end_attempt(self, db: Db, claim: Claim, outcome: str, error: JobFailure | None) -> None:
        db.execute(
            "UPDATE job_attempts SET finished_at = ?, outcome = ?, error_code = ?,"
            " error_message = ? WHERE job_id = ? AND attempt = ? AND worker = ?"
            " AND finished_at IS NULL",
            (
                self._now(db),
                outcome,
                error.code if error else None,
                error.message if error else None,
                claim.job_id,
                claim.attempt,
                claim.owner,
            ),
        )

    @staticmethod
    def _honour_cancel(db: Db, job_id: int, now: float) -> bool:
        """A job sent back to the queue whose cancellation was requested meanwhile ends
        `cancelled` instead of running again."""
        cursor = db.execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?, error_code = 'cancelled',"
            " error_message = 'cancelled while it was running' WHERE id = ?"
            " AND status = 'queued' AND cancel_requested = 1",
            (now, job_id),
        )
        return cursor.rowcount > 0

    async def _end(
        self, end: Callable[[Db], T], claim_next: ClaimNext | None
    ) -> tuple[T, Claim | None]:
        """`end(db)` (an attempt's last write) and, when asked, the claim of the next job, in
        one transaction: both land or neither. The claim is made even when `end` finds the
        attempt fenced off: the worker is free either way, and would claim next anyway."""
        wanted = claim_next
        if self._unreleased:  # a held-up hand-back is written before any claim: `claim` does it
            wanted = None

        def end_and_claim(db: Db) -> tuple[T, Claim | None]:
            ended = end(db)
            if wanted is None:
                return ended, None
            return ended, self._claim(db, wanted.owner, wanted.lease_seconds, wanted.profiles)

        # Grouped: a worker's commit may carry intake writes waiting at the same time.
        return await self.write(end_and_claim, group=True)

    async def complete(self, claim: Claim, outcome: Outcome) -> bool:
        """Write result, detections, timings and status in one transaction; False if fenced off."""
        return (await self.complete_and_claim(claim, outcome, None))[0]

    async def complete_and_claim(
        self, claim: Claim, outcome: Outcome, claim_next: ClaimNext | None
    ) -> tuple[bool, Claim | None]:
        """`complete`, and in the same transaction the claim of the next job (`claim_next`;
        None claims nothing): (done, the job claimed or None)."""

        def complete(db: Db) -> bool:
            began = time.perf_counter()
            if not self._owns(db, claim):
                return False
            now = self._now(db)
            db.execute(
                "INSERT INTO results (job_id, reasoning, created_at, answer, citations,"
                " planned_queries, tiling, redacted_path, geo, west, south, east, north)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    claim.job_id,
                    outcome.reasoning,
                    now,
                    _json_or_null(outcome.answer),
                    json.dumps(list(outcome.citations)),
                    _json_or_null(outcome.planned_queries),
                    _json_or_null(outcome.tiling),
                    outcome.redacted_path,
                    _json_or_null(outcome.geo),
                    *ground_bounds(outcome.geo, (claim.image_exif or {}).get("gps")),
                ),
            )
            geo: list[dict[str, Any] | None] = [*outcome.detection_geo] or [None] * len(
                outcome.detections
            )
            db.executemany(
                "INSERT INTO detections (job_id, idx, label, x1, y1, x2, y2, mask, geo, size_m)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        claim.job_id,
                        number,
                        d.label,
                        *d.box,
                        json.dumps(d.mask) if d.mask is not None else None,
                        _json_or_null(where),
                        ground_size(where),
                    )
                    for number, (d, where) in enumerate(
                        zip(outcome.detections, geo, strict=True), start=1
                    )
                ],
            )
            self._end_attempt(db, claim, "succeeded", None)
            timings = {**outcome.timings, "persist": (time.perf_counter() - began) * 1000}
            db.execute(
                "UPDATE jobs SET status = 'succeeded', finished_at = ?, lease_owner = NULL,"
                " lease_until = NULL, error_code = NULL, error_message = NULL, timings = ?,"
                " models = ? WHERE id = ?",
                (now, json.dumps(timings), json.dumps(outcome.models), claim.job_id),
            )
            return True

        done, following = await self._end(complete, claim_next)
        if done:
            self._offline.pop(claim.job_id, None)
        return done, following

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
        ended = await self.fail_and_claim(
            claim, failure, None, retry_in=retry_in, timings=timings, models=models
        )
        return ended[0]

    async def fail_and_claim(
        self,
        claim: Claim,
        failure: JobFailure,
        claim_next: ClaimNext | None,
        *,
        retry_in: float | None,
        timings: dict[str, float] | None = None,
        models: dict[str, Any] | None = None,
    ) -> tuple[str | None, Claim | None]:
        """`fail`, and in the same transaction the claim of the next job (`claim_next`; None
        claims nothing): (the new status, the job claimed or None)."""

        def fail(db: Db) -> str | None:
            if not self._owns(db, claim):
                return None
            row = db.execute(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ?", (claim.job_id,)
            ).fetchone()
            assert row is not None
            retry = retry_in is not None and row["attempts"] < row["max_attempts"]
            now = self._now(db)
            self._end_attempt(db, claim, "retrying" if retry else "failed", failure)
            db.execute(
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
            if retry and self._honour_cancel(db, claim.job_id, now):
                return "cancelled"
            return "queued" if retry else "failed"

        status, following = await self._end(fail, claim_next)
        if status is not None:
            self._offline.pop(claim.job_id, None)
        return status, following

    async def finish_cancelled(self, claim: Claim, reason: str) -> bool:
        """End a running attempt `cancelled`; False if fenced off."""
        return (await self.cancelled_and_claim(claim, reason, None))[0]

    async def cancelled_and_claim(
        self, claim: Claim, reason: str, claim_next: ClaimNext | None
    ) -> tuple[bool, Claim | None]:
        """`finish_cancelled`, and in the same transaction the claim of the next job
        (`claim_next`; None claims nothing): (done, the job claimed or None)."""

        def finish(db: Db) -> bool:
            if not self._owns(db, claim):
                return False
            failure = JobFailure("cancelled", reason, transient=False)
            self._end_attempt(db, claim, "cancelled", failure)
            db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, lease_owner = NULL,"
                " lease_until = NULL, error_code = ?, error_message = ? WHERE id = ?",
                (self._now(db), failure.code, failure.message, claim.job_id),
            )
            return True

        done, following = await self._end(finish, claim_next)
        if done:
            self._offline.pop(claim.job_id, None)
        return done, following

    async def release(self, claim: Claim, why: JobFailure | None = None) -> bool:
        """Give a running job back (shutdown, a full disk): queued again in its old place, the
        attempt not counted. On a full disk it raises DiskFull and the hand-back is written
        by the next claim or recovery that gets through; until then nothing calls it lost."""
        try:
            released = await self.write(lambda db: self._release(db, claim, why))
        except DiskFull:
            self._offline[claim.job_id] = claim
            self._unreleased[claim.job_id] = (claim, why)
            raise
        self._offline.pop(claim.job_id, None)
        self._unreleased.pop(claim.job_id, None)
        return released

    def _release(self, db: Db, claim: Claim, why: JobFailure | None) -> bool:
        if not self._owns(db, claim):
            return False
        self._end_attempt(db, claim, "released", why)
        now = self._now(db)
        # run_after stays as it was: the job goes back to its place in line, not the end. The
        # attempt keeps its number (numbers are never reused) and is not spent: the job gets
        # one more, while the budget a later retry grants stays the one it was submitted with.
        db.execute(
            "UPDATE jobs SET status = 'queued', max_attempts = max_attempts + 1,"
            " attempt_budget = coalesce(attempt_budget, max_attempts),"
            " lease_owner = NULL, lease_until = NULL WHERE id = ?",
            (claim.job_id,),
        )
        self._honour_cancel(db, claim.job_id, now)
        return True

    async def _write_hand_backs(self) -> None:
        """The hand-backs a full disk held up, before anything else is written."""
        for claim, why in list(self._unreleased.values()):
            await self.release(claim, why)

    async def recover(self, *, expired_only: bool) -> tuple[int, int]:
        """Running jobs whose worker is gone go back to the queue, or to `failed` once their
        attempts are used up (a job that kills its worker every time must not loop forever).
        At start-up every running job is orphaned (the data directory is locked to one
        process); later only expired leases are. Returns (requeued, failed).

        A requeued job keeps its `run_after`, so it runs next, ahead of everything that
        arrived while it was running. A job whose lease a full disk kept this process from
        extending or handing back is not lost: its worker is alive and finishes it."""
        expired_only = expired_only or not self.sole_owner
        lease_filter = " AND lease_until < ?" if expired_only else ""
        held_offline: dict[int, tuple[str, int]] = {}

        def recover(db: Db) -> tuple[int, int]:
            now = self._now(db)
            args: tuple[Any, ...] = (now,) if expired_only else ()
            rows = db.execute(self._RUNNING + lease_filter + self._LOCK_ROWS, args).fetchall()
            requeued = failed = 0
            for row in rows:
                if held_offline.get(row["id"]) == (row["lease_owner"], row["attempts"]):
                    continue
                lost = JobFailure(
                    "worker_lost",
                    f"the worker running attempt {row['attempts']} stopped without finishing "
                    "(crash, kill or power loss)",
                    transient=True,
                )
                give_up = row["attempts"] >= row["max_attempts"]
                db.execute(
                    "UPDATE job_attempts SET finished_at = ?, outcome = 'lost', error_code = ?,"
                    " error_message = ? WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
                    (now, lost.code, lost.message, row["id"], row["attempts"]),
                )
                db.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?,"
                    " lease_owner = NULL, lease_until = NULL, error_code = ?, error_message = ?"
                    " WHERE id = ?",
                    (
                        "failed" if give_up else "queued",
                        now if give_up else None,
                        lost.code,
                        lost.message,
                        row["id"],
                    ),
                )
                self._honour_cancel(db, row["id"], now)
                failed += give_up
                requeued += not give_up
            return requeued, failed

        await self._write_hand_backs()
        # Copied on the event loop, which alone changes `_offline`, not read from the thread.
        held_offline.update((job_id, (c.owner, c.attempt)) for job_id, c in self._offline.items())
        return await self.write(recover)

    # -- the user's side ------------------------------------------------------------------

    async def request_cancel(self, job_id: int) -> str:
        """Cancel a queued job now; ask a running one to stop at its next stage boundary."""

        def cancel(db: Db) -> str:
            status = self._status(db, job_id)
            if status == "queued":
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?, error_code = ?,"
                    " error_message = ? WHERE id = ?",
                    (self._now(db), "cancelled", "cancelled before it started", job_id),
                )
                return "cancelled"
            if status == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return "running"
            raise Conflict(f"job {job_id} is already {status}", code="job_finished")

        return await self.write(cancel)

    async def retry(self, job_id: int) -> None:
        """Queue a failed or cancelled job again with a fresh attempt budget: as many more
        attempts as it was submitted with, numbered on from the last (never reused, so the
        attempt history and the lease fence stay unambiguous)."""

        def retry(db: Db) -> None:
            status = self._status(db, job_id)
            if status not in ("failed", "cancelled"):
                raise Conflict(
                    f"job {job_id} is {status}; only failed or cancelled jobs can be retried",
                    code="job_not_retryable",
                )
            now = self._now(db)
            db.execute(
                "UPDATE jobs SET status = 'queued', run_after = ?, queued_at = ?,"
                " attempt_budget = coalesce(attempt_budget, max_attempts),"
                " max_attempts = attempts + coalesce(attempt_budget, max_attempts),"
                " started_at = NULL, finished_at = NULL, cancel_requested = 0,"
                " error_code = NULL, error_message = NULL WHERE id = ?",
                (now, now, job_id),
            )

        await self.write(retry)

    @classmethod
    def _status(cls, db: Db, job_id: int) -> str:
        row = db.execute(
            "SELECT status FROM jobs WHERE id = ?" + cls._LOCK_ROW, (job_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} does not exist", code="job_not_found")
        return str(row["status"])

    async def counts(self) -> dict[str, int]:
        rows = await self.read(
            lambda db: db.execute(
                "SELECT status, count(*) AS n FROM jobs GROUP BY status"
            ).fetchall()
        )
        found = {row["status"]: row["n"] for row in rows}
        return {status: int(found.get(status, 0)) for status in STATUSES}

    async def seconds_until_runnable(self) -> float | None:
        """How long until the earliest queued job becomes runnable, by the clock run-after
        times are written in (for the worker's sleep); None when nothing is queued."""

        def read(db: Db) -> float | None:
            row = db.execute("SELECT min(run_after) AS t FROM jobs WHERE status = 'queued'")
            t = row.fetchone()["t"]
            return None if t is None else float(t) - self._now(db)

        return await self.read(read)
