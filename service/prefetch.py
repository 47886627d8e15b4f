"""A one-slot look-ahead for the worker: while a job infers, decode the stored image of the job
the queue hands out next, so that job's decode is done when it is claimed. It claims nothing
and changes no job: it only reads which queued job comes first."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from PIL import Image

from service.intake import open_for_models
from service.store.db import Db
from service.store.files import StoredFiles
from service.store.queue import Queue

log = logging.getLogger("aip.worker")

Decoded = tuple[Image.Image, tuple[int, int]]


def next_queued_image(db: Db) -> str | None:
    """The stored image of the queued job a claim takes next, in the claim's own order (a job
    waiting out a retry backoff sorts after those runnable now, as its `run_after` is later)."""
    row = db.execute(
        "SELECT images.path FROM jobs JOIN images ON images.sha256 = jobs.image_sha256"
        " WHERE jobs.status = 'queued' ORDER BY jobs.run_after, jobs.id LIMIT 1"
    ).fetchone()
    return None if row is None else str(row[0])


class Prefetch:
    """Why this is sound without claiming ahead: a stored image is named by its content and
    written once, so its decode is the same whichever job asks and whenever; the slot is
    matched by path when a job is claimed, and a miss (another job came first, the next one
    was cancelled, nothing was queued) decodes then, as without a look-ahead. Leases,
    heartbeats and cancels stay with claims alone: the next job is claimed only when it is
    about to run, so nothing here can hold a job or leave one half-started."""

    def __init__(self, data_dir: Path, queue: Queue, files: StoredFiles | None = None) -> None:
        self.data_dir = data_dir
        self.queue = queue
        self.files = files  # fetches an image another node stored; None: local files only
        self.hits = 0
        self.misses = 0
        self._path: str | None = None
        self._decoding: asyncio.Future[Decoded] | None = None
        self._looking: asyncio.Task[None] | None = None
        self._again = False

    def ahead(self) -> None:
        """Start decoding the next queued job's image, without waiting for it (call as the
        current job's inference begins, and when a job is queued while one runs)."""
        if self._looking is None or self._looking.done():
            self._looking = asyncio.create_task(self._look(), name="aip-prefetch")
        else:  # it may have read the queue before this job was committed: read it again
            self._again = True

    async def _look(self) -> None:
        path = None
        self._again = True
        while self._again:
            self._again = False
            try:
                path = await self.queue.read(next_queued_image)
            except Exception:  # optional work: the claim decodes it instead
                log.debug("looking ahead in the queue failed", exc_info=True)
                return
        if path is None or path == self._path:
            return
        if self.files is not None:
            try:
                await self.files.local(path)
            except Exception:  # optional work: the claim fetches it (or fails the job) instead
                return
        self._path = path
        loop = asyncio.get_running_loop()
        decoding = loop.run_in_executor(None, open_for_models, self.data_dir, path)
        # Its error, if any, is raised to the job that takes it; unclaimed, it is dropped.
        decoding.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._decoding = decoding

    @property
    def holding(self) -> str | None:
        """The stored image decoded (or being decoded) ahead, if any."""
        return self._path if self._decoding is not None else None

    async def take(self, path: str) -> Decoded:
        """The job's image decoded for the models: the look-ahead's when it decoded this path,
        else decoded now. Errors are the decode's own, either way."""
        if self._looking is not None and not self._looking.done():
            self._looking.cancel()  # still reading the queue: too late to help this job
        decoding, ahead = self._decoding, self._path
        self._decoding = self._path = None
        # A file removed since (retention) must fail the job as it would have without this.
        if decoding is not None and ahead == path and (self.data_dir / path).is_file():
            self.hits += 1
            return await decoding
        self.misses += 1
        if self.files is not None:
            await self.files.local(path)  # FileNotFoundError when it is stored nowhere
        return await asyncio.to_thread(open_for_models, self.data_dir, path)

    def close(self) -> None:
        """Drop the look-ahead (the worker is stopping)."""
        if self._looking is not None:
            self._looking.cancel()
        self._decoding = self._path = None
