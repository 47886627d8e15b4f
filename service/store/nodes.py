"""The nodes table's SQL: register a node, beat, mark it stopped, list every node with its
state. Every time written or compared is the store's clock (`Queue.now`: PostgreSQL's on a
shared database, so nodes' drifting clocks never decide who is lost)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.store.db import Db
from service.store.queue import Queue

HEARTBEAT_SECONDS = 5.0
LOST_AFTER_BEATS = 3  # a node this many beats late is shown as lost
FORGET_SECONDS = 86400.0  # stopped or lost nodes older than this are deleted by any beat

_COLUMNS = (
    "id, host, pid, role, models, profiles, current_job, jobs_done, started_at, heartbeat_at,"
    " stopped_at"
)


@dataclass(frozen=True)
class Node:
    """What a node says of itself when it registers."""

    id: str
    host: str
    pid: int
    role: str  # "serve" or "worker"
    models: dict[str, Any]
    profiles: tuple[str, ...] | None  # None: every profile


@dataclass(frozen=True)
class Beat:
    """What changes between beats."""

    current_job: int | None
    jobs_done: int
    models: dict[str, Any]


async def register(queue: Queue, node: Node) -> None:
    """Insert the node (again, if its row was forgotten), started and beating now."""

    def write(db: Db) -> None:
        now = queue.now(db)
        db.execute(
            "INSERT INTO nodes (id, host, pid, role, models, profiles, current_job, jobs_done,"
            " started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, NULL, 0, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,"
            " stopped_at = NULL",
            (
                node.id,
                node.host,
                node.pid,
                node.role,
                json.dumps(node.models),
                None if node.profiles is None else json.dumps(list(node.profiles)),
                now,
                now,
            ),
        )

    await queue.write(write)


async def beat(queue: Queue, node_id: str, state: Beat) -> bool:
    """Record a heartbeat and delete nodes gone for more than FORGET_SECONDS; False when the
    node's own row is gone (forgotten while it was unreachable): register it again."""

    def write(db: Db) -> bool:
        now = queue.now(db)
        found = db.execute(
            "UPDATE nodes SET heartbeat_at = ?, current_job = ?, jobs_done = ?, models = ?"
            " WHERE id = ? AND stopped_at IS NULL",
            (now, state.current_job, state.jobs_done, json.dumps(state.models), node_id),
        ).rowcount
        db.execute(
            "DELETE FROM nodes WHERE id <> ? AND coalesce(stopped_at, heartbeat_at) < ?",
            (node_id, now - FORGET_SECONDS),
        )
        return bool(found)

    return await queue.write(write)


async def stop(queue: Queue, node_id: str, jobs_done: int) -> None:
    """Mark a clean stop: the node runs nothing any more."""

    def write(db: Db) -> None:
        db.execute(
            "UPDATE nodes SET stopped_at = ?, current_job = NULL, jobs_done = ? WHERE id = ?",
            (queue.now(db), jobs_done, node_id),
        )

    await queue.write(write)


async def listing(queue: Queue, *, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> list[Any]:
    """Every node the table holds, newest first, with its state decided by the store's clock
    (stopped; lost: LOST_AFTER_BEATS beats late; else alive) and the seconds since its last
    beat. Rows as the database gives them (see `view`)."""

    def read(db: Db) -> list[Any]:
        now = queue.now(db)
        return [
            (*row, now)
            for row in db.execute(
                f"SELECT {_COLUMNS}, CASE WHEN stopped_at IS NOT NULL THEN 'stopped'"
                " WHEN heartbeat_at < ? THEN 'lost' ELSE 'alive' END AS state"
                " FROM nodes ORDER BY started_at DESC, id",
                (now - LOST_AFTER_BEATS * heartbeat_seconds,),
            ).fetchall()
        ]

    return await queue.read(read)


def view(row: Any) -> dict[str, Any]:
    """One node as GET /v1/nodes shows it, from a row of `listing`."""
    from service.store.reads import iso

    (
        node_id, host, pid, role, models, profiles, current_job, jobs_done, started_at,
        heartbeat_at, stopped_at, state, now,
    ) = row  # fmt: skip
    return {
        "id": node_id,
        "host": host,
        "pid": pid,
        "role": role,
        "state": state,
        "models": json.loads(models) if models else {},
        "profiles": json.loads(profiles) if profiles else None,
        "current_job": current_job,
        "jobs_done": jobs_done,
        "started_at": iso(started_at),
        "last_heartbeat": iso(heartbeat_at),
        "stopped_at": iso(stopped_at),
        "seconds_since_heartbeat": round(max(now - heartbeat_at, 0.0), 1),
    }
