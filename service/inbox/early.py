"""Reading and checking inbox images while they settle: the read, decode and hash that queueing
a file needs, done during the settle wait and used only when the settled file still has the
size and mtime it had before it was read. Knows no ledger, no queue and no filing."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from service.intake import ImageRecord, inspect_image

# Bytes of files read early and not yet queued, at most: a burst is read ahead this far.
MAX_BYTES = 64 * 1024 * 1024

Read = tuple[bytes, ImageRecord]


@dataclass(frozen=True)
class _Early:
    size: int
    mtime_ns: int
    task: asyncio.Task[Read | None]


class EarlyReads:
    """Reads started while files settle, one per core at a time, held until taken or dropped."""

    def __init__(self, max_pixels: int, max_bytes: int = MAX_BYTES) -> None:
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._held = 0
        self._reads: dict[str, _Early] = {}
        self._limit = asyncio.Semaphore(os.cpu_count() or 2)

    def start(self, relative: str, path: Path, size: int, mtime_ns: int) -> None:
        """Read `path` early, as it is now (`size`, `mtime_ns`), if there is room."""
        if relative in self._reads or self._held + size > self._max_bytes:
            return
        self._held += size
        task = asyncio.create_task(self._read(path, size, mtime_ns))
        self._reads[relative] = _Early(size, mtime_ns, task)

    async def _read(self, path: Path, size: int, mtime_ns: int) -> Read | None:
        """None when the file changed or does not read: the usual path then decides."""
        async with self._limit:
            try:
                data = await asyncio.to_thread(path.read_bytes)
                if len(data) != size or _stat(path) != (size, mtime_ns):
                    return None
                image = await asyncio.to_thread(inspect_image, data, max_pixels=self._max_pixels)
            except Exception:
                return None
        return data, image

    async def take(self, relative: str, size: int, mtime_ns: int) -> Read | None:
        """The early read of `relative` if it read these very bytes: the settled file has the
        size and mtime it had before the read started, so nothing has written to it since."""
        early = self._reads.pop(relative, None)
        if early is None:
            return None
        self._held -= early.size
        if (early.size, early.mtime_ns) != (size, mtime_ns):
            early.task.cancel()
            return None
        return await early.task

    def keep_only(self, relative_paths: Collection[str]) -> None:
        """Drop the early reads of files no longer waiting (queued, refused, gone)."""
        for relative in [r for r in self._reads if r not in relative_paths]:
            early = self._reads.pop(relative)
            self._held -= early.size
            early.task.cancel()

    async def close(self) -> None:
        tasks = [early.task for early in self._reads.values()]
        self.keep_only(())
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
