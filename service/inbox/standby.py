"""Which node watches the inbox: the start-up claim (the file lock; on PostgreSQL the advisory
lock first, or standby) and, on PostgreSQL, the periodic re-check that hands the watching over
to a standby node when the watching one stops or loses its lock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.config import Settings
from service.errors import StartupRefused
from service.inbox.lock import InboxLock, shared_inbox_lock
from service.inbox.watcher import InboxWatcher
from service.periodic import every

if TYPE_CHECKING:
    from service.services import Services
    from service.store.postgres.advisory import AdvisoryLock

log = logging.getLogger("aip.inbox")

CHECK_SECONDS = 5.0  # how soon a standby node notices that the watching one is gone


class InboxSupervisor:
    """Holds this node's claim on the inbox and, while the service runs, its watcher."""

    def __init__(self, settings: Settings, *, check_seconds: float | None = None) -> None:
        self.settings = settings
        self.check_seconds = CHECK_SECONDS if check_seconds is None else check_seconds
        # A worker node (`aip worker`) watches no inbox.
        self.wanted = settings.inbox_enabled and settings.serve_api
        self.file_lock = InboxLock(settings.inbox_dir, settings.data_dir)
        self.shared: AdvisoryLock | None = None
        self.watcher: InboxWatcher | None = None
        self.owner = False
        self._make_watcher: Callable[[], InboxWatcher] | None = None
        self._services: Services | None = None
        self._turn = asyncio.Lock()  # one check at a time, and none once stopping
        self._stopped = False
        self._failing = False  # a check is failing: said once until it succeeds again

    def claim_local(self) -> None:
        """SQLite: hold the inbox before the store is touched, or raise StartupRefused."""
        if self.wanted and self.settings.database_url is None:
            self.file_lock.acquire()
            self.owner = True

    async def claim_shared(self, url: str | None) -> None:
        """PostgreSQL: watch if no other node on the database does, else start as standby.
        The file lock is taken too: a service on another store may watch the folder."""
        if not self.wanted or url is None:
            return
        self.shared = shared_inbox_lock(url, self.settings.inbox_dir)
        if await asyncio.to_thread(self.shared.acquire):
            self.file_lock.acquire()
            self.owner = True
        else:
            log.warning(
                "not watching %s: another node on this database watches it",
                self.settings.inbox_dir,
            )

    def start(self, make_watcher: Callable[[], InboxWatcher], services: Services) -> None:
        """Start watching if this node holds the inbox; `services.inbox` follows the watcher."""
        self._make_watcher = make_watcher
        self._services = services
        if self.owner:
            self._watch()
            log.info("watching %s for images", self.settings.inbox_dir)

    def supervise(self) -> asyncio.Task[None] | None:
        """PostgreSQL: the periodic check (a task for the lifespan to cancel); else None."""
        if self.shared is None:
            return None
        return asyncio.create_task(
            every(self.check_seconds, self.check, what="the inbox lock check", log=log)
        )

    async def check(self) -> None:
        async with self._turn:
            if self._stopped or self.shared is None:
                return
            if self.owner:
                await self._keep()
            else:
                await self._take_over()

    async def stop(self) -> None:
        """No more checks (one under way finishes first), then the watcher stops."""
        async with self._turn:
            self._stopped = True
        await self._unwatch()

    def release(self) -> None:
        self.file_lock.release()
        if self.shared is not None:
            self.shared.release()

    # -- the checks -----------------------------------------------------------------------

    async def _keep(self) -> None:
        assert self.shared is not None
        if await asyncio.to_thread(self.shared.held):
            return
        # The lock's session is gone (a database restart): nobody else can watch while
        # the database is unreachable, so keep watching until another node holds it.
        try:
            retaken = await asyncio.to_thread(self.shared.acquire)
        except Exception as exc:
            self._failed(exc)
            return
        self._failing = False
        if retaken:
            log.info(
                "took the lock on %s again after its database session ended; still watching",
                self.settings.inbox_dir,
            )
            return
        log.warning(
            "stopped watching %s: another node on this database watches it now",
            self.settings.inbox_dir,
        )
        await self._unwatch()
        self.file_lock.release()
        self.owner = False

    async def _take_over(self) -> None:
        assert self.shared is not None
        try:
            got = await asyncio.to_thread(self.shared.acquire)
        except Exception as exc:
            self._failed(exc)
            return
        if not got:
            self._failing = False
            return
        try:
            self.file_lock.acquire()
        except StartupRefused as refused:
            # Still held by the node that watched it (its lock lapsed for a moment) or by a
            # service on another store: let go, so that one keeps it, and try again later.
            self.shared.release()
            if not self._failing:
                log.warning("not taking over the inbox: %s", refused.message)
            self._failing = True
            return
        self._failing = False
        self.owner = True
        self._watch()
        log.warning(
            "now watching %s for images: the node on this database that watched it is gone",
            self.settings.inbox_dir,
        )

    def _failed(self, exc: Exception) -> None:
        if not self._failing:
            log.warning("cannot check the inbox lock on the database (%s); trying again", exc)
        self._failing = True

    def _watch(self) -> None:
        assert self._make_watcher is not None and self._services is not None
        self.watcher = self._make_watcher()
        self.watcher.start()
        self._services.inbox = self.watcher

    async def _unwatch(self) -> None:
        watcher, self.watcher = self.watcher, None
        if self._services is not None:
            self._services.inbox = None
        if watcher is not None:
            await watcher.stop()
