"""Reading and checking inbox images while they settle: the read, decode and hash that queueing
a file needs, done during the settle wait and used only when the settled file is still the
file that was read (same inode) with the size and mtime it had before it was read. Knows no
ledger, no queue and no filing."""

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
    path: Path
    size: int
    mtime_ns: int
    task: asyncio.Task[tuple[Read, tuple[int, int]] | None]  # and the inode it read


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
        self._reads[relative] = _Early(path, size, mtime_ns, task)

    async def _read(
        self, path: Path, size: int, mtime_ns: int
    ) -> tuple[Read, tuple[int, int]] | None:
        """None when the file changed or does not read: the usual path then decides."""
        async with self._limit:
            try:
                data, stat = await asyncio.to_thread(_read_with_stat, path)
                if len(data) != size or (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
                    return None
                image = await asyncio.to_thread(inspect_image, data, max_pixels=self._max_pixels)
            except Exception:
                return None
        return (data, image), (stat.st_dev, stat.st_ino)

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
        done = await early.task
        if done is None:
            return None
        read, inode = done
        try:  # replaced by a rename since (`cp -p`, `rsync -t` keep size and mtime)
            now = early.path.stat()
        except OSError:
            return None
        return read if (now.st_dev, now.st_ino) == inode else None

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


def _read_with_stat(path: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the stat of the very file they came from."""
    with path.open("rb") as file:
        return file.read(), os.fstat(file.fileno())
