"""Webhook deliveries as rows: which are due, and each attempt's outcome; the only code that
changes a delivery. A delivery is created by the database itself (migrations/0008), in the
transaction that ends its job, so it knows nothing of how jobs end or of HTTP.

    pending -> delivered            (a 2xx answer)
    pending -> pending              (any other answer, or none: tried again later)
    pending -> failed               (still not delivered when its retry window closed)
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text

from service.store.db import Db
from service.store.queue import Queue

if TYPE_CHECKING:
    from service.store.reads import Reads

STATES = ("pending", "delivered", "failed")
MAX_ERROR_CHARS = 500

# What a job's view shows of each delivery (service/store/reads.py reads them with the job).
COLUMNS = (
    "id, event, url, status, attempts, last_status, last_error, created_at, next_attempt_at,"
    " delivered_at"
)

_DUE = text(
    "SELECT id, job_id, event, url, attempts, created_at FROM webhook_deliveries"
    " WHERE status = 'pending' AND next_attempt_at <= :now"
    " ORDER BY next_attempt_at, created_at, id LIMIT :limit"
)
_NEXT = text(
    "SELECT min(next_attempt_at) FROM webhook_deliveries"
    " WHERE status = 'pending' AND next_attempt_at > :now"
)


@dataclass(frozen=True)
class Delivery:
    """A pending delivery: what sending it needs."""

    id: str
    job_id: int
    event: str
    url: str
    attempts: int  # made so far
    created_at: float


def view(row: Any) -> dict[str, Any]:
    """One delivery as a job's view shows it, from a row of COLUMNS."""
    from service.store.reads import iso  # reads imports this module

    (
        delivery_id, event, url, status, attempts, last_status, last_error, created_at,
        next_attempt_at, delivered_at,
    ) = row  # fmt: skip
    return {
        "delivery_id": delivery_id,
        "event": event,
        "url": url,
        "status": status,
        "attempts": attempts,
        "last_status": last_status,
        "last_error": last_error,
        "created_at": iso(created_at),
        "next_attempt_at": iso(next_attempt_at),
        "delivered_at": iso(delivered_at),
    }


async def due(
    reads: Reads, now: float, limit: int, busy: Collection[str] = ()
) -> tuple[list[Delivery], float | None]:
    """Up to `limit` deliveries due at `now`, oldest due first, leaving out those in `busy`
    (being sent); and when the next one not yet due falls due (None: none waits). One read."""

    def read(conn: Connection) -> tuple[list[Delivery], float | None]:
        rows = conn.execute(_DUE, {"now": now, "limit": limit + len(busy)}).all()
        found = [Delivery(*row) for row in rows if row[0] not in busy][:limit]
        later = conn.execute(_NEXT, {"now": now}).scalar()
        return found, None if later is None else float(later)

    return await reads.run(read)


def _clip(error: str | None) -> str | None:
    return None if error is None else error[:MAX_ERROR_CHARS]


async def record(
    queue: Queue,
    delivery: Delivery,
    *,
    now: float,
    http_status: int | None,
    error: str | None,
    retry_at: float | None,
) -> str | None:
    """One attempt's outcome: delivered when `error` is None; else pending again until
    `retry_at`, or failed when that is None. Returns the delivery's new status, or None when
    it is gone (its job was pruned) or no longer pending."""
    status = "delivered" if error is None else "pending" if retry_at is not None else "failed"

    def write(db: Db) -> str | None:
        cursor = db.execute(
            "UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1,"
            " last_status = ?, last_error = ?, next_attempt_at = ?, delivered_at = ?"
            " WHERE id = ? AND status = 'pending'",
            (
                status,
                http_status,
                _clip(error),
                retry_at if status == "pending" else None,
                now if status == "delivered" else None,
                delivery.id,
            ),
        )
        return status if cursor.rowcount else None

    return await queue.write(write)
