"""The job state machine on PostgreSQL, shared by every node: the SQLite machine's transitions,
with claims that pass over rows another node holds (FOR UPDATE SKIP LOCKED), fenced transitions
that lock their row before they check it, the database's clock for every lease, run-after time
and timestamp (nodes' clocks drift), and no start-up assumption that this node is the only one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from service.diskspace import watch
from service.store.db import Db
from service.store.postgres.connection import PgConnection
from service.store.queue import Queue
from service.store.writer import Writer

ABORTED_FOR_ANOTHER = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


class PgQueue(Queue):
    _CLAIM = Queue._CLAIM.replace(
        "ORDER BY run_after, id LIMIT 1)", "ORDER BY run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
    )
    _PROFILE = "(params::jsonb ->> 'profile')"
    # A job another node's recovery is handling is left to it.
    _LOCK_ROWS = " FOR UPDATE SKIP LOCKED"
    # Read committed: without the lock another node's recovery could requeue the job between
    # the fence's check and the write that relies on it.
    _LOCK_ROW = " FOR UPDATE"
    sole_owner = False
    dialect = "postgresql"

    @classmethod
    async def connect(
        cls, url: str, data_dir: Path, *, clock: Callable[[], float] = time.time
    ) -> PgQueue:
        conn = await asyncio.to_thread(PgConnection, url)
        return cls(Writer(conn), clock=clock, disk=watch(data_dir))

    def _now(self, db: Db) -> float:
        return float(
            db.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
        )

    @staticmethod
    def _aborted_for_another(exc: Exception) -> bool:
        # Two nodes' transactions locking the same rows in opposite orders: PostgreSQL
        # aborts one of them, which is safe to run again (a write is a function of the
        # database alone).
        return isinstance(
            exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure
        )

    @staticmethod
    def _duplicate_key(exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)
