"""Stored files (input images, redacted copies) by their path relative to the store's root:
local files, and on a shared PostgreSQL store also rows every node can fetch them from."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from service.atomic import write_atomically, write_once
from service.config import Settings
from service.store.db import Db
from service.store.queue import Queue


class StoredFiles:
    """Three modes. SQLite: files under the data directory only. PostgreSQL (the default):
    files under the data directory as this node's cache, and each one in `stored_files`, so a
    node that lacks it fetches it from there. PostgreSQL with AIP_IMAGE_STORE: files only,
    under that folder, which every node mounts. A path names its content (images) or its job
    (redacted copies), so a row once written is never rewritten: ON CONFLICT DO NOTHING."""

    def __init__(self, root: Path, queue: Queue | None = None) -> None:
        """`queue`: the store's, when the database holds the files (PostgreSQL without a
        shared folder); None for files only."""
        self.root = root
        self._queue = queue

    @classmethod
    def of(cls, settings: Settings, queue: Queue) -> StoredFiles:
        """The stored files `settings` call for, their rows written through `queue`."""
        if settings.database_url is None:
            return cls(settings.data_dir)
        if settings.image_store is not None:
            return cls(settings.image_store)
        return cls(settings.data_dir, queue)

    @property
    def in_database(self) -> bool:
        return self._queue is not None

    def path(self, path: str) -> Path:
        """Where `path` lives (or would be cached) on this node."""
        return self.root / path

    async def put(self, path: str, data: bytes) -> Path:
        """Store `data` as `path`: the local file, written atomically (one already there with
        as many bytes is the same content: only its mtime is refreshed, so a retention run in
        progress leaves it), and in database mode its row."""
        target = self.path(path)
        await asyncio.to_thread(write_once, target, data)
        await self._insert(path, data)
        return target

    async def share(self, path: str) -> None:
        """Make a file already written locally as `path` reachable from every node (database
        mode: its row; a no-op otherwise)."""
        if self._queue is not None:
            await self._insert(path, await asyncio.to_thread(self.path(path).read_bytes))

    async def _insert(self, path: str, data: bytes) -> None:
        if self._queue is None:
            return
        row = (path, data, len(data), hashlib.sha256(data).hexdigest(), time.time())

        def insert(db: Db) -> None:
            db.execute(
                "INSERT INTO stored_files (path, data, bytes, sha256, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (path) DO NOTHING",
                row,
            )

        await self._queue.write(insert)

    async def local(self, path: str) -> Path:
        """The local file of `path`; in database mode one missing here is fetched from
        `stored_files` into the local cache first. FileNotFoundError when it is nowhere."""
        target = self.path(path)
        if target.is_file():
            return target
        if self._queue is not None:

            def fetch(db: Db) -> Any:
                return db.execute(
                    "SELECT data, sha256 FROM stored_files WHERE path = ?", (path,)
                ).fetchone()

            row = await self._queue.read(fetch)
            if row is not None:
                data = bytes(row[0])
                if hashlib.sha256(data).hexdigest() != row[1]:
                    raise OSError(f"the stored copy of {path} is damaged (its sha256 differs)")
                await asyncio.to_thread(write_atomically, target, lambda out: out.write(data))
                return target
        raise FileNotFoundError(f"{path} is not stored (removed by retention, or never written)")

    async def delete(self, path: str, *, unless_touched_since: float | None = None) -> bool:
        """Remove `path`: the local file and its row. With `unless_touched_since`, a local
        file touched since then (the same bytes submitted again) is kept, and so is its row.
        True when a local file was removed."""
        target = self.path(path)
        removed = False
        try:
            if unless_touched_since is not None and (
                target.stat().st_mtime >= unless_touched_since
            ):
                return False
            target.unlink()
            removed = True
        except FileNotFoundError:
            pass
        if self._queue is not None:

            def drop(db: Db) -> int:
                return int(db.execute("DELETE FROM stored_files WHERE path = ?", (path,)).rowcount)

            removed = bool(await self._queue.write(drop)) or removed
        return removed
