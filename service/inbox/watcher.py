"""The inbox watcher: notices files (events, a start-up scan, periodic rescans), waits until
each is fully written, then queues it once and files the original away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

from watchfiles import Change, awatch

from service.config import Settings
from service.errors import AipError
from service.inbox.filing import file_away, write_error
from service.inbox.rules import ParamsError, ignored_folder, kind_of, params_for, sidecar_of
from service.intake import inspect_image, store_image
from service.pipeline import build_params
from service.store.ledger import Entry, FileSeen, Ledger

log = logging.getLogger("aip.inbox")


@dataclass
class Pending:
    size: int
    mtime_ns: int
    changed_at: float  # monotonic time the size or mtime last changed
    note: str = ""  # why it is still waiting, when not just settling


@dataclass
class Counts:
    ingested: int = 0
    duplicates: int = 0
    rejected: int = 0
    already_known: int = 0


@dataclass
class InboxWatcher:
    settings: Settings
    ledger: Ledger
    notify: Callable[[], None]
    root: Path = field(init=False)
    mode: str = "starting"
    pending: dict[str, Pending] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    last_scan: float | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = self.settings.inbox_dir.resolve()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._tasks = [
            asyncio.create_task(self._watch(), name="aip-inbox-events"),
            asyncio.create_task(self._settle_loop(), name="aip-inbox-settle"),
            asyncio.create_task(self._rescan_loop(), name="aip-inbox-rescan"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.root),
            "mode": self.mode,
            "moving": self.settings.inbox_move,
            "settle_seconds": self.settings.inbox_settle_seconds,
            "rescan_seconds": self.settings.inbox_rescan_seconds,
            "pending": len(self.pending),
            "waiting": {p: w.note for p, w in sorted(self.pending.items()) if w.note},
            "since_start": vars(self.counts),
            "last_scan_at": self.last_scan,
        }

    # -- noticing files -------------------------------------------------------------------

    async def _watch(self) -> None:
        polling = self.settings.inbox_polling
        while not self._stop.is_set():
            self.mode = "polling" if polling else "events"
            try:
                async for changes in awatch(
                    self.root,
                    watch_filter=self._interesting,
                    stop_event=self._stop,
                    force_polling=polling,
                    poll_delay_ms=int(self.settings.inbox_settle_seconds * 250) or 50,
                    debounce=50,
                    step=20,
                    recursive=True,
                    ignore_permission_denied=True,
                ):
                    for change, path in changes:
                        if change == Change.deleted:
                            continue
                        if os.path.isdir(path):
                            # Files written into a new folder before its watch was set up
                            # raise no events of their own: look inside.
                            await asyncio.to_thread(self.scan, Path(path))
                        else:
                            self.consider(Path(path))
                return
            except Exception as exc:
                if polling:
                    log.exception("inbox watcher failed; the periodic rescan still runs")
                    self.mode = "rescan-only"
                    return
                log.warning(
                    "native file events are unavailable (%s); polling %s instead", exc, self.root
                )
                polling = True

    def _interesting(self, change: Change, path: str) -> bool:
        try:
            relative = Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return False
        return kind_of(relative) != "ignore"

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.to_thread(self.scan)
            await asyncio.sleep(self.settings.inbox_rescan_seconds)

    def scan(self, top: Path | None = None) -> None:
        """Walk the inbox (files present at start, events the stream dropped)."""
        for folder, dirs, files in os.walk(top or self.root):
            here = Path(folder)
            dirs[:] = [
                d for d in dirs if not ignored_folder((here / d).relative_to(self.root).as_posix())
            ]
            for name in files:
                self.consider(here / name)
        if top is None:
            self.last_scan = time.time()

    def consider(self, path: Path) -> None:
        """Start waiting for a file to settle (a file already waiting keeps its clock)."""
        try:
            relative = path.relative_to(self.root).as_posix()
        except ValueError:
            return
        if relative in self.pending or kind_of(relative) in ("ignore", "config", "sidecar"):
            return
        try:
            if path.is_symlink() and not path.resolve().is_relative_to(self.root):
                log.warning("not following %s: it points outside the inbox", relative)
                return
            stat = path.stat()
        except OSError:
            return
        if not S_ISREG(stat.st_mode):
            return
        # A file whose last write is already older than the settle delay was renamed or
        # copied into place complete: it need not wait again.
        age = time.time() - stat.st_mtime
        changed_at = time.monotonic() - (age if age > self.settings.inbox_settle_seconds else 0)
        self.pending[relative] = Pending(stat.st_size, stat.st_mtime_ns, changed_at)

    # -- settling and ingesting -----------------------------------------------------------

    async def _settle_loop(self) -> None:
        interval = max(self.settings.inbox_settle_seconds / 10, 0.02)
        # Decoding and fsyncs overlap well: handle up to one file per core at a time.
        limit = asyncio.Semaphore(os.cpu_count() or 2)
        while True:
            await asyncio.sleep(interval)
            ready = [file for relative in list(self.pending) if (file := self._settled(relative))]
            await asyncio.gather(*(self._handle(file, limit) for file in ready))

    def _settled(self, relative: str) -> FileSeen | None:
        """The file, once its size and mtime have held still for the settle delay."""
        waiting = self.pending[relative]
        try:
            stat = (self.root / relative).stat()
        except FileNotFoundError:
            del self.pending[relative]
            return None
        now = time.monotonic()
        if (stat.st_size, stat.st_mtime_ns) != (waiting.size, waiting.mtime_ns):
            waiting.size, waiting.mtime_ns, waiting.changed_at = (
                stat.st_size,
                stat.st_mtime_ns,
                now,
            )
            return None
        if now - waiting.changed_at < self.settings.inbox_settle_seconds:
            return None
        return FileSeen(relative, stat.st_size, stat.st_mtime_ns)

    async def _handle(self, file: FileSeen, limit: asyncio.Semaphore) -> None:
        async with limit:
            try:
                if await self._ingest(file.relative_path, file):
                    self.pending.pop(file.relative_path, None)
            except Exception:
                log.exception("inbox: %s could not be handled; will look again", file.relative_path)

    async def _ingest(self, relative: str, file: FileSeen) -> bool:
        """Handle one settled file; False keeps it waiting."""
        known = await self.ledger.known(file)
        if known is not None:
            self.counts.already_known += 1
            await self._file(relative, known)
            return True
        if kind_of(relative) == "other":
            await self._reject(
                file, "unsupported_type", "not an image file type (by its extension)", None
            )
            return True
        try:
            found = await asyncio.to_thread(params_for, self.root, relative)
        except ParamsError as exc:
            await self._reject(file, "invalid_params", str(exc), None)
            return True
        sidecar = self.root / sidecar_of(relative)
        if found.sidecar_required and not sidecar.is_file():
            self.pending[relative].note = f"waiting for its sidecar {sidecar_of(relative)}"
            return False
        settings = self.settings
        try:
            params = build_params(
                found.queries,
                found.prompt,
                default_queries=settings.default_queries,
                default_prompt=settings.default_prompt,
                max_queries=settings.max_queries,
                max_prompt_chars=settings.max_prompt_chars,
            )
            if file.size > settings.max_upload_bytes:
                raise AipError(
                    f"larger than {settings.max_upload_bytes:,} bytes", code="payload_too_large"
                )
            data = await asyncio.to_thread((self.root / relative).read_bytes)
            if len(data) != file.size:
                return False  # still being written after all
            image = await asyncio.to_thread(inspect_image, data, max_pixels=settings.max_pixels)
        except AipError as exc:
            if exc.code == "corrupt_image" and self._may_still_grow(relative):
                self.pending[relative].note = "incomplete image; waiting for more bytes"
                return False
            await self._reject(file, exc.code, exc.message, None)
            return True
        await asyncio.to_thread(store_image, data, image, settings.data_dir)
        max_attempts = found.max_attempts or settings.max_attempts
        entry = await self.ledger.accept(file, image, params.to_dict(), max_attempts=max_attempts)
        if entry.outcome == "queued":
            self.counts.ingested += 1
            self.notify()
            log.info("inbox: %s -> job %s", relative, entry.job_id)
        else:
            self.counts.duplicates += 1
            log.info("inbox: %s duplicates job %s", relative, entry.job_id)
        await self._file(relative, entry)
        return True

    def _may_still_grow(self, relative: str) -> bool:
        """A truncated image gets a few more settle periods before it is called corrupt: a
        writer on a slow share can pause longer than the settle delay."""
        quiet = time.monotonic() - self.pending[relative].changed_at
        return quiet < self.settings.inbox_settle_seconds * 5

    async def _reject(self, file: FileSeen, code: str, message: str, sha: str | None) -> None:
        self.counts.rejected += 1
        log.warning("inbox: %s rejected: %s", file.relative_path, message)
        entry = await self.ledger.reject(file, code, message, sha)
        await self._file(file.relative_path, entry)

    async def _file(self, relative: str, entry: Entry) -> None:
        if not self.settings.inbox_move or entry.filed_to is not None:
            return
        folder = "failed" if entry.outcome == "rejected" else "processed"
        companions = [sidecar_of(relative)] if kind_of(relative) == "image" else []
        moved = await asyncio.to_thread(file_away, self.root, relative, folder, companions)
        if entry.outcome == "rejected":
            await asyncio.to_thread(
                write_error,
                self.root,
                moved,
                entry.error_code or "rejected",
                entry.error_message or "rejected",
            )
        await self.ledger.filed(entry, moved)
