"""The follow-up state machine: the only code that changes a follow-up question's state.

    queued -> running -> succeeded | failed
    running -> queued            (the service stopped while it ran: answered at the next start)

A follow-up belongs to a succeeded job and never changes the job: its failure is its own.
Every transition is one transaction on the queue's writer thread."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from service.errors import Conflict, NotFound
from service.store.queue import Queue

STATES = ("queued", "running", "succeeded", "failed")


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


async def ask(queue: Queue, job_id: int, question: str, max_tokens: int) -> int:
    """Record a question on a succeeded job; returns its number, once durable."""

    def insert(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} does not exist", code="job_not_found")
        if row["status"] != "succeeded":
            raise Conflict(
                f"job {job_id} is {row['status']}: follow-up questions need a succeeded job "
                "(wait for it to finish, or retry it)",
                code="job_not_succeeded",
            )
        n = db.execute(
            "SELECT coalesce(max(n), 0) + 1 AS n FROM followups WHERE job_id = ?", (job_id,)
        ).fetchone()["n"]
        db.execute(
            "INSERT INTO followups (job_id, n, question, max_tokens, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (job_id, n, question, max_tokens, time.time()),
        )
        return int(n)

    return await queue.write(insert, group=True)


async def claim(queue: Queue) -> Ask | None:
    """Take the oldest queued follow-up whose job still has its result, or None."""

    def take(db: sqlite3.Connection) -> Ask | None:
        row = db.execute(
            "UPDATE followups SET status = 'running', started_at = ?"
            " WHERE rowid = (SELECT rowid FROM followups WHERE status = 'queued'"
            "                ORDER BY created_at, job_id, n LIMIT 1)"
            " RETURNING job_id, n, question, max_tokens",
            (time.time(),),
        ).fetchone()
        if row is None:
            return None
        job = db.execute(
            "SELECT jobs.params, images.path, images.width, images.height, results.reasoning"
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
        )

    return await queue.write(take)


async def finish(queue: Queue, job_id: int, n: int, answer: str, timings: dict[str, float]) -> None:
    await queue.write(
        lambda db: db.execute(
            "UPDATE followups SET status = 'succeeded', answer = ?, timings = ?,"
            " finished_at = ? WHERE job_id = ? AND n = ? AND status = 'running'",
            (answer, json.dumps(timings), time.time(), job_id, n),
        )
    )


async def fail(
    queue: Queue, job_id: int, n: int, code: str, message: str, timings: dict[str, float]
) -> None:
    await queue.write(
        lambda db: db.execute(
            "UPDATE followups SET status = 'failed', error_code = ?, error_message = ?,"
            " timings = ?, finished_at = ? WHERE job_id = ? AND n = ? AND status = 'running'",
            (code, message, json.dumps(timings), time.time(), job_id, n),
        )
    )


async def recover(queue: Queue) -> int:
    """At start: follow-ups a stopped service was answering are queued again."""

    def requeue(db: sqlite3.Connection) -> int:
        cursor = db.execute(
            "UPDATE followups SET status = 'queued', started_at = NULL WHERE status = 'running'"
        )
        return cursor.rowcount

    return await queue.write(requeue)


# What `view` reads, in its order.
FOLLOWUP_COLUMNS = (
    "n, question, answer, status, error_code, error_message, timings, created_at, finished_at"
)


def view(job_id: int, row: Any) -> dict[str, Any]:
    """One follow-up as the API shows it, from a row of FOLLOWUP_COLUMNS."""
    from service.store.reads import iso  # reads imports this module

    n, question, answer, status, code, message, timings, created_at, finished_at = row
    return {
        "n": n,
        "question": question,
        "answer": answer,
        "status": status,
        "created_at": iso(created_at),
        "finished_at": iso(finished_at),
        "timings_ms": {k: round(v, 1) for k, v in json.loads(timings).items()} if timings else {},
        "error": {"code": code, "message": message} if code else None,
        "links": {"self": f"/v1/jobs/{job_id}/followups/{n}"},
    }
