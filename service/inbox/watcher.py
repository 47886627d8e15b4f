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
from service.diskspace import is_disk_full, watch
from service.errors import AipError
from service.events import EventBus
from service.inbox.early import EarlyReads
from service.inbox.filing import file_away, write_duplicate, write_error
from service.inbox.repair import repair_unfiled
from service.inbox.reprocess import reprocess_file
from service.inbox.rules import ParamsError, ignored_folder, kind_of, params_for, sidecar_of
from service.intake import inspect_image
from service.jobspec import Profiles, resolve
from service.store.files import StoredFiles
from service.store.ledger import Entry, FileSeen, Ledger

log = logging.getLogger("aip.inbox")


@dataclass
class Pending:
    size: int
    mtime_ns: int
    changed_at: float  # monotonic time the size or mtime last changed
    note: str = ""  # why it is still waiting, when not just settling
    next_look: float = 0.0  # monotonic time before which it is not looked at again
    failures: int = 0  # unexpected errors so far; the wait doubles after each


MAX_FAILURES = 5


@dataclass
class Counts:
    ingested: int = 0
    duplicates: int = 0
    rejected: int = 0
    already_known: int = 0
    reprocessed: int = 0  # duplicates processed again on purpose (sidecar or API)


@dataclass
class InboxWatcher:
    settings: Settings
    ledger: Ledger
    notify: Callable[[], None]
    profiles: Profiles | None = None  # named job parameters a folder or sidecar may choose
    events: EventBus = field(default_factory=EventBus)
    files: StoredFiles | None = None  # where stored copies go; None: the data directory
    root: Path = field(init=False)
    mode: str = "starting"
    pending: dict[str, Pending] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    last_scan: float | None = None
    given_up: set[str] = field(default_factory=set)  # failed MAX_FAILURES times this run
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _rescan_now: asyncio.Event = field(default_factory=asyncio.Event)
    _early: EarlyReads = field(init=False)
    _files: StoredFiles = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.settings.inbox_dir.resolve()
        self._files = self.files or StoredFiles(self.settings.data_dir)
        self._early = EarlyReads(self.settings.max_pixels)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._tasks = [
            asyncio.create_task(self._watch(), name="aip-inbox-events"),
            asyncio.create_task(self._settle_loop(), name="aip-inbox-settle"),
            asyncio.create_task(self._rescan_loop(), name="aip-inbox-rescan"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._report_death)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # A task that died was logged when it did; stopping must go on regardless.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._early.close()

    @staticmethod
    def _report_death(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("inbox: %s stopped: %r", task.get_name(), task.exception())

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
            began = time.monotonic()
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
                # Failing at once means this kind of watching does not work here; one bad
                # event (watchfiles gives up on a file name that is not UTF-8) or a later
                # failure does not: watch again the same way. Either way, a scan once the new
                # watch is up finds whatever arrived while nothing watched.
                quick = time.monotonic() - began < 2.0
                one_bad_event = "decode path" in repr(exc)
                if quick and not polling and not one_bad_event:
                    log.warning(
                        "native file events are unavailable (%s); polling %s instead",
                        exc,
                        self.root,
                    )
                    polling = True
                else:
                    log.warning("inbox watcher restarting after an error: %r", exc)
                    await asyncio.sleep(1.0 if one_bad_event or not quick else 10.0)
                asyncio.get_running_loop().call_later(0.5, self._rescan_now.set)

    def _interesting(self, change: Change, path: str) -> bool:
        try:
            relative = Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return False
        return kind_of(relative) != "ignore"

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.to_thread(self.scan)
            self._rescan_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._rescan_now.wait(), timeout=self.settings.inbox_rescan_seconds
                )

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
        if relative in self.pending or relative in self.given_up:
            return
        if kind_of(relative) in ("ignore", "config", "sidecar"):
            return
        try:
            relative.encode("utf-8")
        except UnicodeEncodeError:
            self.given_up.add(relative)
            log.warning("inbox: ignoring %r: its name is not valid UTF-8; rename it", relative)
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

    async def _repair(self) -> None:
        """Before any file is handled: record where a crash left files it had moved."""
        try:
            repairs = await repair_unfiled(self.ledger, self.root)
        except Exception:
            log.exception("inbox: could not repair the ledger after a crash; going on")
            return
        if repairs.filed:
            log.info("inbox: recorded %d files a crash had filed unrecorded", repairs.filed)

    async def _settle_loop(self) -> None:
        if self.settings.inbox_move:
            await self._repair()
        interval = max(self.settings.inbox_settle_seconds / 10, 0.02)
        # Decoding and fsyncs overlap well: handle up to one file per core at a time.
        limit = asyncio.Semaphore(os.cpu_count() or 2)
        while True:
            await asyncio.sleep(interval)
            self._early.keep_only(self.pending)
            ready = [file for relative in list(self.pending) if (file := self._settled(relative))]
            await asyncio.gather(*(self._handle(file, limit) for file in ready))

    def _settled(self, relative: str) -> FileSeen | None:
        """The file, once its size and mtime have held still for the settle delay."""
        waiting = self.pending[relative]
        now = time.monotonic()
        if now < waiting.next_look:
            return None
        try:
            stat = (self.root / relative).stat()
        except OSError:  # gone, or its folder replaced, or unreadable: a later event re-adds it
            del self.pending[relative]
            return None
        if (stat.st_size, stat.st_mtime_ns) != (waiting.size, waiting.mtime_ns):
            waiting.size, waiting.mtime_ns, waiting.changed_at = (
                stat.st_size,
                stat.st_mtime_ns,
                now,
            )
            return None
        if now - waiting.changed_at < self.settings.inbox_settle_seconds:
            # Still since the last look: decode it while it settles (used only if unchanged).
            plain = not waiting.note and not waiting.failures and kind_of(relative) == "image"
            if plain and stat.st_size <= self.settings.max_upload_bytes:
                self._early.start(relative, self.root / relative, stat.st_size, stat.st_mtime_ns)
            return None
        return FileSeen(relative, stat.st_size, stat.st_mtime_ns)

    async def _handle(self, file: FileSeen, limit: asyncio.Semaphore) -> None:
        relative = file.relative_path
        async with limit:
            try:
                done = await self._ingest(file)
            except Exception as exc:
                if is_disk_full(exc):
                    # Not the file's fault: it stays in the inbox, uncounted, for the next scan.
                    if not isinstance(exc, AipError):  # the queue has said so already
                        watch(self.settings.data_dir).note_full(f"taking in {relative}")
                    self.pending.pop(relative, None)
                    return
                waiting = self.pending[relative]
                waiting.failures += 1
                if waiting.failures >= MAX_FAILURES:
                    del self.pending[relative]
                    self.given_up.add(relative)
                    log.exception(
                        "inbox: giving up on %s after %d tries; it stays where it "
                        "is until the service restarts",
                        relative,
                        waiting.failures,
                    )
                    return
                delay = min(self.settings.inbox_settle_seconds * 2**waiting.failures, 300.0)
                waiting.next_look = time.monotonic() + delay
                log.warning(
                    "inbox: %s could not be handled (%s); trying again in %.0f s",
                    relative,
                    waiting.failures,
                    delay,
                    exc_info=True,
                )
                return
            if done:
                self.pending.pop(relative, None)
            else:  # waiting for something (a sidecar, more bytes): look again a settle later
                self.pending[relative].next_look = (
                    time.monotonic() + self.settings.inbox_settle_seconds
                )

    async def _ingest(self, file: FileSeen) -> bool:
        """Handle one settled file; False keeps it waiting."""
        relative = file.relative_path
        known = await self.ledger.known(file)
        if known is not None:
            self.counts.already_known += 1
            await self._file(relative, known)
            return True
        if kind_of(relative) == "other":
            await self._reject(
                file, "unsupported_type", "not an image file type (by its extension)"
            )
            return True
        sidecar = sidecar_of(relative)
        waiting = self.pending[relative]
        try:
            found = await asyncio.to_thread(params_for, self.root, relative)
        except ParamsError as exc:
            # A sidecar written moments ago may simply be unfinished: give it the same grace
            # as a truncated image before calling it broken.
            if sidecar is not None and self._written_within(self.root / sidecar, 5):
                waiting.note = f"waiting for its sidecar {sidecar} to be complete"
                return False
            await self._reject(file, "invalid_params", str(exc))
            return True
        if sidecar is not None and found.sidecar_required and not (self.root / sidecar).is_file():
            waiting.note = f"waiting for its sidecar {sidecar}"
            return False
        settings = self.settings
        try:
            params = await resolve(found.given, found.folder, self.profiles, settings)
            if file.size > settings.max_upload_bytes:
                raise AipError(
                    f"the file is {file.size:,} bytes, over the limit of "
                    f"{settings.max_upload_bytes:,} (AIP_MAX_UPLOAD_BYTES)",
                    code="payload_too_large",
                )
            early = await self._early.take(relative, file.size, file.mtime_ns)
            if early is not None:
                data, image = early
            else:
                data = await asyncio.to_thread((self.root / relative).read_bytes)
                if len(data) != file.size:
                    return False  # still being written after all
                image = await asyncio.to_thread(inspect_image, data, max_pixels=settings.max_pixels)
        except AipError as exc:
            if exc.code == "corrupt_image" and self._written_within(self.root / relative, 5):
                self.pending[relative].note = "incomplete image; waiting for more bytes"
                return False
            await self._reject(file, exc.code, exc.message)
            return True
        await self._files.put(image.path, data)
        max_attempts = found.max_attempts or settings.max_attempts
        entry = await self.ledger.accept(
            file, image, params.to_dict(), max_attempts=max_attempts, reprocess=found.reprocess
        )
        if entry.outcome == "queued":
            self.counts.ingested += 1
            self.notify()
            log.info("inbox: %s -> job %s", relative, entry.job_id)
        elif entry.outcome == "reprocessed":
            self.counts.reprocessed += 1
            self.notify()
            log.info("inbox: %s processed again as asked -> job %s", relative, entry.job_id)
        else:
            self.counts.duplicates += 1
            log.info("inbox: %s duplicates job %s", relative, entry.job_id)
        if entry.outcome != "duplicate":
            self._created(relative, entry.job_id)
        await self._file(relative, entry)
        self.events.publish(
            "inbox.filed",
            {"path": relative, "job_id": entry.job_id, "outcome": entry.outcome},
            job_id=entry.job_id,
        )
        return True

    def _created(self, relative: str, job_id: int | None) -> None:
        name = relative.rsplit("/", 1)[-1]
        self.events.publish("job.created", {"source": "inbox", "input_name": name}, job_id=job_id)

    def _written_within(self, path: Path, settle_periods: float) -> bool:
        """A truncated image or unparsable sidecar written this recently gets more time before
        it is called broken: a writer on a slow share can pause longer than the settle delay."""
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        return age < self.settings.inbox_settle_seconds * settle_periods

    async def _reject(self, file: FileSeen, code: str, message: str) -> None:
        self.counts.rejected += 1
        log.warning("inbox: %s rejected: %s", file.relative_path, message)
        entry = await self.ledger.reject(file, code, message)
        await self._file(file.relative_path, entry)
        self.events.publish(
            "inbox.rejected", {"path": file.relative_path, "code": code, "message": message}
        )

    async def _file(self, relative: str, entry: Entry) -> None:
        if not self.settings.inbox_move or entry.filed_to is not None:
            return
        folder = "failed" if entry.outcome == "rejected" else "processed"
        sidecar = sidecar_of(relative) if kind_of(relative) == "image" else None
        companions = [sidecar] if sidecar else []
        moved = await asyncio.to_thread(file_away, self.root, relative, folder, companions)
        if entry.outcome == "rejected":
            await asyncio.to_thread(
                write_error,
                self.root,
                moved,
                entry.error_code or "rejected",
                entry.error_message or "rejected",
            )
        elif entry.outcome == "duplicate" and entry.job_id is not None:
            await asyncio.to_thread(write_duplicate, self.root, moved, entry.job_id)
        await self.ledger.filed(entry, moved)

    async def reprocess(self, raw_path: str) -> int:
        """A new job for the inbox file `raw_path` (filed or not), even for content seen
        before; the job id."""
        job_id = await reprocess_file(
            self.settings, self.ledger, raw_path, self.profiles, self._files
        )
        self.counts.reprocessed += 1
        self._created(raw_path, job_id)
        self.notify()
        log.info("inbox: %s processed again as asked -> job %s", raw_path, job_id)
        return job_id
