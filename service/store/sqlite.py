"""Connection settings for the one SQLite file: WAL, durable commits, busy timeout, foreign keys."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

BUSY_TIMEOUT_MS = 10_000

# FULL makes an accepted job survive a power cut, not just a crash; on macOS fsync alone
# does not reach the platter, so F_FULLFSYNC is asked for too.
_PRAGMAS = [
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA foreign_keys=ON",
]
if sys.platform == "darwin":
    _PRAGMAS.append("PRAGMA fullfsync=ON")


def connect_writer(path: Path) -> sqlite3.Connection:
    """The long-lived connection every state change goes through (autocommit; explicit BEGIN),
    handed to the one writer thread that uses it from then on."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )
    conn.row_factory = sqlite3.Row
    for pragma in _PRAGMAS:
        conn.execute(pragma)
    return conn


def read_engine(path: Path) -> AsyncEngine:
    """SQLAlchemy engine for the read models (history, job details)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    return engine
