"""The follow-up state machine: the only code that changes a follow-up question's state.

    queued -> running -> succeeded | failed
    running -> queued            (the service stopped while it ran: answered at the next start)

A job takes MAX_PER_JOB follow-ups in all, MAX_QUEUED of them waiting at once.

A follow-up belongs to a succeeded job and never changes the job: its failure is its own.
Every transition is one transaction on the queue's writer thread."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from service.errors import AipError, Conflict, NotFound
from service.store.db import Db
from service.store.dialect import skip_locked_sql
from service.store.queue import Queue

STATES = ("queued", "running", "succeeded", "failed")
# Per job: questions waiting at once, and in all. The cap in all also bounds the full-text
# triggers, which concatenate a job's follow-ups again on each question and answer.
MAX_QUEUED = 8
MAX_PER_JOB = 100


class TooManyWaiting(AipError):
    status = 429
    code = "too_many_followups"


@dataclass(frozen=True)
class Ask:
    """A claimed follow-up with what answering it needs: the job's image, prompt, result."""

    job_id: int
    n: int
    question: str
    max_tokens: int
    image_path: str
    width: int
    height: int
    params: dict[str, Any]
    reasoning: str
    detections: list[tuple[str, float, float, float, float]]
    redacted_path: str | None = None  # the job's redacted copy, when it redacts

    @property
    def key(self) -> tuple[int, int]:
        return self.job_id, self.n


async def ask(queue: Queue, job_id: int, question: str, max_tokens: int) -> int:
    """Record a question on a succeeded job; returns its number, once durable."""

    def insert(db: Db) -> int:
        row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} does not exist", code="job_not_found")
        if row["status"] != "succeeded":
            raise Conflict(
                f"job {job_id} is {row['status']}: follow-up questions need a succeeded job "
                "(wait for it to finish, or retry it)",
                code="job_not_succeeded",
            )
        counts = db.execute(
            "SELECT coalesce(max(n), 0) AS asked, count(*) FILTER (WHERE status = 'queued')"
            " AS waiting FROM followups WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        if counts["asked"] >= MAX_PER_JOB:
            raise Conflict(
                f"job {job_id} has its {MAX_PER_JOB} follow-up questions, the most a job takes:"
                " submit the image again as a new job to ask more",
                code="followup_limit",
            )
        if counts["waiting"] >= MAX_QUEUED:
            raise TooManyWaiting(
                f"job {job_id} has {counts['waiting']} follow-up questions waiting, the most "
                "at once: ask again once some are answered"
            )
        n = counts["asked"] + 1
        db.execute(
            "INSERT INTO followups (job_id, n, question, max_tokens, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (job_id, n, question, max_tokens, time.time()),
        )
        return int(n)

    return await queue.write(insert, group=True)


def pending(conn: Connection) -> bool:
    """On a read connection: whether any follow-up is queued (cheaper than a claim)."""
    return bool(
        conn.execute(
            text("SELECT EXISTS (SELECT 1 FROM followups WHERE status = 'queued')")
        ).scalar_one()
    )


def read_one(conn: Connection, job_id: int, n: int) -> dict[str, Any]:
    """On a read connection: follow-up `n` of the job as the API shows it."""
    if conn.execute(text("SELECT 1 FROM jobs WHERE id = :id"), {"id": job_id}).first() is None:
        raise NotFound(f"job {job_id} does not exist", code="job_not_found")
    row = conn.execute(
        text(f"SELECT {FOLLOWUP_COLUMNS} FROM followups WHERE job_id = :id AND n = :n"),
        {"id": job_id, "n": n},
    ).first()
    if row is None:
        raise NotFound(f"job {job_id} has no follow-up {n}", code="followup_not_found")
    return view(job_id, tuple(row))


async def claim(queue: Queue, owner: str, lease_seconds: float) -> Ask | None:
    """Take the oldest queued follow-up whose job still has its result, or None; `owner`
    holds it for `lease_seconds` (no heartbeat: as long as an answer may take)."""

    skip_locked = skip_locked_sql(queue.dialect)

    def take(db: Db) -> Ask | None:
        now = queue.now(db)
        row = db.execute(
            "UPDATE followups SET status = 'running', started_at = ?, lease_owner = ?,"
            " lease_until = ?"
            " WHERE (job_id, n) = (SELECT job_id, n FROM followups WHERE status = 'queued'"
            f"                     ORDER BY created_at, job_id, n LIMIT 1{skip_locked})"
            " RETURNING job_id, n, question, max_tokens",
            (now, owner, now + lease_seconds),
        ).fetchone()
        if row is None:
            return None
        job = db.execute(
            "SELECT jobs.params, images.path, images.width, images.height, results.reasoning,"
            " results.redacted_path"
            " FROM jobs JOIN images ON images.sha256 = jobs.image_sha256"
            " JOIN results ON results.job_id = jobs.id WHERE jobs.id = ?",
            (row["job_id"],),
        ).fetchone()
        found = db.execute(
            "SELECT label, x1, y1, x2, y2 FROM detections WHERE job_id = ? ORDER BY idx",
            (row["job_id"],),
        ).fetchall()
        return Ask(
            row["job_id"],
            row["n"],
            row["question"],
            row["max_tokens"],
            job["path"] if job else "",
            job["width"] if job else 0,
            job["height"] if job else 0,
            json.loads(job["params"]) if job else {},
            job["reasoning"] if job else "",
            [(d["label"], d["x1"], d["y1"], d["x2"], d["y2"]) for d in found],
            job["redacted_path"] if job else None,
        )

    return await queue.write(take)


def _identity(reasoner: dict[str, Any] | None) -> str | None:
    return json.dumps(reasoner) if reasoner else None


# An attempt's end is written only while its owner still holds it: once another node queued
# it again, a late answer is dropped.
_HELD = " WHERE job_id = ? AND n = ? AND status = 'running' AND lease_owner = ?"
_UNLEASED = "lease_owner = NULL, lease_until = NULL"


async def finish(
    queue: Queue,
    ask: Ask,
    owner: str,
    answer: str,
    timings: dict[str, float],
    reasoner: dict[str, Any] | None = None,
) -> bool:
    """`reasoner`: the identity of the model that answered (a job's `models.reasoner`).
    False when `owner` no longer held it."""
    ended = "status = 'succeeded', answer = ?"
    return await _end(queue, ask, owner, ended, (answer,), timings, reasoner)


async def fail(
    queue: Queue,
    ask: Ask,
    owner: str,
    code: str,
    message: str,
    timings: dict[str, float],
    reasoner: dict[str, Any] | None = None,
) -> bool:
    ended = "status = 'failed', error_code = ?, error_message = ?"
    return await _end(queue, ask, owner, ended, (code, message), timings, reasoner)


async def _end(
    queue: Queue,
    ask: Ask,
    owner: str,
    ended: str,
    values: tuple[Any, ...],
    timings: dict[str, float],
    reasoner: dict[str, Any] | None,
) -> bool:
    def write(db: Db) -> bool:
        cursor = db.execute(
            f"UPDATE followups SET {ended}, timings = ?, reasoner = ?, finished_at = ?,"
            f" {_UNLEASED}" + _HELD,
            (*values, json.dumps(timings), _identity(reasoner), queue.now(db), *ask.key, owner),
        )
        return cursor.rowcount > 0

    return await queue.write(write)


async def release(queue: Queue, job_id: int, n: int, owner: str) -> None:
    """At a stop: a follow-up still being answered is queued again, answered at the next start
    (here or on another node)."""
    await queue.write(
        lambda db: db.execute(
            f"UPDATE followups SET status = 'queued', started_at = NULL, {_UNLEASED}" + _HELD,
            (job_id, n, owner),
        )
    )


async def recover(queue: Queue, *, expired_only: bool) -> int:
    """Follow-ups whose answering node is gone are queued again: at start-up every running
    one where this process is the database's only user (SQLite), else those whose lease is
    up (the database's clock)."""
    expired_only = expired_only or not queue.sole_owner

    def requeue(db: Db) -> int:
        lease = " AND lease_until < ?" if expired_only else ""
        cursor = db.execute(
            f"UPDATE followups SET status = 'queued', started_at = NULL, {_UNLEASED}"
            " WHERE status = 'running'" + lease,
            (queue.now(db),) if expired_only else (),
        )
        return cursor.rowcount

    return await queue.write(requeue)


# What `view` reads, in its order.
FOLLOWUP_COLUMNS = (
    "n, question, answer, status, error_code, error_message, timings, created_at, finished_at,"
    " reasoner"
)


def view(job_id: int, row: Any) -> dict[str, Any]:
    """One follow-up as the API shows it, from a row of FOLLOWUP_COLUMNS."""
    from service.store.reads import iso  # reads imports this module

    n, question, answer, status, code, message, timings, created_at, finished_at, model = row
    return {
        "n": n,
        "question": question,
        "answer": answer,
        "status": status,
        "created_at": iso(created_at),
        "finished_at": iso(finished_at),
        "timings_ms": {k: round(v, 1) for k, v in json.loads(timings).items()} if timings else {},
        "error": {"code": code, "message": message} if code else None,
        "reasoner": json.loads(model) if model else None,
        "links": {"self": f"/v1/jobs/{job_id}/followups/{n}"},
    }
