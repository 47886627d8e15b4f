"""Opens the configured store: the embedded SQLite file, or a PostgreSQL database that several
nodes share. Either way the rest of the service gets the same queue and read models."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.config import Settings
from service.errors import StartupRefused
from service.store.files import StoredFiles
from service.store.migrate import migrate
from service.store.queue import Queue
from service.store.reads import Reads
from service.store.sqlite import read_engine

if TYPE_CHECKING:
    from service.store.postgres.advisory import AdvisoryLock

log = logging.getLogger("aip")


def sqlalchemy_url(url: str) -> str:
    """A postgresql:// URL for SQLAlchemy's psycopg 3 dialect."""
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def shown(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        credentials, host = rest.rsplit("@", 1)
        rest = f"{credentials.split(':', 1)[0]}@{host}"
    return f"{scheme}://{rest}"


@dataclass
class Store:
    queue: Queue
    reads: Reads
    backend: str  # "sqlite" or "postgresql"
    where: str  # for logs: the file, or the URL without its password
    url: str | None = None  # PostgreSQL's
    files: StoredFiles | None = None  # images and redacted copies; set by open_store
    _closing: list[Callable[[], Any]] = field(default_factory=list)

    def on_job_queued(self, wake: Callable[[], None]) -> None:
        """Call `wake` when another node may have queued a job (PostgreSQL's NOTIFY); on
        SQLite this process is the only writer, and wakes its worker itself."""
        if self.backend != "postgresql":
            return
        from service.store.postgres.listen import JOBS_CHANNEL, Listener

        assert self.url is not None
        listener = Listener(self.url, JOBS_CHANNEL, wake)
        listener.start()
        self._closing.append(listener.stop)

    def one_node_lock(self, duty: str) -> AdvisoryLock | None:
        """On PostgreSQL, the lock whose holder alone does `duty` among the nodes sharing the
        database; None on SQLite, where this process is the only one."""
        if self.url is None:
            return None
        from service.store.postgres.advisory import AdvisoryLock, lock_key

        return AdvisoryLock(self.url, lock_key(duty))

    async def close(self) -> None:
        for stop in reversed(self._closing):
            await stop()
        await self.reads.close()
        await self.queue.close()


def database_errors() -> tuple[type[Exception], ...]:
    """The exception types a database error reaches a route as (the driver's own, or
    SQLAlchemy's wrapping of it)."""
    from sqlalchemy.exc import DBAPIError

    try:
        import psycopg
    except ImportError:
        return (DBAPIError,)
    return (DBAPIError, psycopg.Error)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is the shared database being out of reach: refused,
    dropped or restarting connections, as opposed to a bug."""
    try:
        import psycopg
    except ImportError:
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, psycopg.OperationalError):
            return True
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    return False


def _engine(url: str) -> AsyncEngine:
    return create_async_engine(sqlalchemy_url(url), pool_pre_ping=True)


async def open_store(settings: Settings, *, clock: Callable[[], float] = time.time) -> Store:
    """Migrate (under an advisory lock on PostgreSQL: nodes may start together) and open."""
    url = settings.database_url
    if settings.image_store is not None:
        if url is None:
            raise StartupRefused(
                "AIP_IMAGE_STORE is for nodes sharing a PostgreSQL database (AIP_DATABASE_URL);"
                " alone, the service keeps its images in the data directory"
            )
        if not settings.image_store.is_dir():
            raise StartupRefused(
                f"the image store {settings.image_store} does not exist (is the share "
                "mounted?); mount or create it, or fix AIP_IMAGE_STORE / --image-store"
            )
    if url is None:
        applied = await asyncio.to_thread(migrate, settings.database)
        where = str(settings.database)
        if applied:
            log.info("database %s migrated to %s", where, applied[-1])
        queue = await Queue.open(settings.database, clock=clock)
        files = StoredFiles.of(settings, queue)
        return Store(queue, Reads(read_engine(settings.database)), "sqlite", where, files=files)
    try:
        import psycopg

        from service.store.postgres.migrate import migrate as migrate_postgres
        from service.store.postgres.queue import PgQueue
    except ImportError:
        raise StartupRefused(
            "PostgreSQL needs its driver: pip install 'aerial-intelligence-pipeline[postgres]'"
            " (or unset AIP_DATABASE_URL / --database for the embedded SQLite file)"
        ) from None
    try:
        applied = await asyncio.to_thread(migrate_postgres, url)
        pg_queue = await PgQueue.connect(url, settings.data_dir, clock=clock)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise StartupRefused(
            f"cannot reach the database {shown(url)} ({reason}); check AIP_DATABASE_URL or "
            "--database"
        ) from None
    if applied:
        log.info("database %s migrated to %s", shown(url), applied[-1])
    files = StoredFiles.of(settings, pg_queue)
    return Store(pg_queue, Reads(_engine(url)), "postgresql", shown(url), url=url, files=files)
