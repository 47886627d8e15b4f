"""A PostgreSQL session advisory lock on a connection of its own: one node among those sharing
the database does a thing (watch an inbox, send webhooks). Closing the connection, or the node
dying, frees it for another."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import psycopg


def lock_key(name: str) -> int:
    """A signed 64-bit key for `name`, the same on every node."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class AdvisoryLock:
    def __init__(self, url: str, key: int) -> None:
        self.url = url
        self.key = key
        self._conn: Any = None

    def acquire(self) -> bool:
        """Hold the lock (True), or learn that another node holds it (False)."""
        if self.held():
            return True
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except BaseException:
            conn.close()
            raise
        if not (row and row[0]):
            conn.close()
            return False
        self._conn = conn
        return True

    def held(self) -> bool:
        """Whether this node still holds it: its connection is alive (the server frees the
        lock of a lost session)."""
        if self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
