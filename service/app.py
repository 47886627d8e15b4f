"""create_app(settings): the FastAPI factory and its lifespan, which wires store, models and
worker together and takes them down in order."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.api import docs as docs_api
from service.api import events as events_api
from service.api import flights as flights_api
from service.api import followups as followups_api
from service.api import health, history, inbox, jobs, pages
from service.api import metrics as metrics_api
from service.api import models as models_api
from service.api import nodes as nodes_api
from service.api import profiles as profiles_api
from service.api.guard import BrowserGuard
from service.api.metrics import RequestMetrics
from service.config import Settings, parse_age
from service.diskspace import is_disk_full, watch
from service.errors import AipError, DiskFull, PayloadTooLarge, StartupRefused
from service.events import EventBus
from service.followups import FollowUps
from service.inbox.standby import InboxSupervisor
from service.inbox.watcher import InboxWatcher
from service.leftovers import remove_unfinished_images
from service.metrics import Metrics
from service.models.host import ModelHost
from service.nodes import NodeHeartbeat
from service.periodic import every
from service.private import enter_private_umask, leave_private_umask, tighten
from service.profiles import BUILTINS, NO_PROFILE
from service.services import Services
from service.store import followups as followup_store
from service.store.backend import Store, database_errors, database_unreachable, open_store
from service.store.files import StoredFiles
from service.store.ledger import Ledger
from service.store.profiles import Profiles
from service.store.queue import Queue
from service.store.reads import Reads
from service.store.retention import prune
from service.webhooks import Webhooks
from service.worker import Worker

log = logging.getLogger("aip")


class DataDirLock:
    """One service per data directory: two workers on one queue would fight over leases.
    While it is held, what the process writes is private to its user (umask 0o077)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "aip.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        enter_private_umask()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except BaseException:
            leave_private_umask()
            raise
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            leave_private_umask()
            raise StartupRefused(
                f"another aip service{f' (pid {holder})' if holder.isdigit() else ''} is "
                f"already using the data directory {self.path.parent}; stop it, or give this "
                "one its own with --data-dir or AIP_DATA_DIR"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            leave_private_umask()


class BodyLimit:
    """Refuse an oversized request body with 413 before it is read: by Content-Length when
    declared, else by counting the bytes as they stream in. The body may exceed the upload
    limit by `slack` (multipart framing, form fields); the message names the limit itself."""

    def __init__(self, app: ASGIApp, limit: int, slack: int = 1024 * 1024) -> None:
        self.app = app
        self.upload_limit = limit
        self.limit = limit + slack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, self._error())
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error()
            return message

        await self.app(scope, counted, send)

    def _error(self) -> PayloadTooLarge:
        return jobs.upload_too_large(self.upload_limit)


async def _send_error(send: Send, error: AipError) -> None:
    response = JSONResponse(error.to_dict(), status_code=error.status)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AipError)
    async def _aip_error(_: Request, exc: AipError) -> JSONResponse:
        # A message may quote the request's own text: one that cannot be UTF-8 (a lone
        # surrogate) is escaped, or the refusal itself would fail to encode.
        body = {k: v.encode("utf-8", "backslashreplace").decode() for k, v in exc.to_dict().items()}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        # A full disk while storing an upload is the user's to fix, not a bug: 507 with the
        # free space, and nothing was queued. Any other OSError is unexpected (500).
        if not is_disk_full(exc):
            raise exc
        refusal = watch(request.app.state.services.settings.data_dir).note_full(
            "storing a submitted image"
        )
        return JSONResponse(refusal.to_dict(), status_code=refusal.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return JSONResponse({"code": "invalid_request", "message": message}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # The framework's own refusals of a body it cannot parse (not UTF-8 JSON, broken
            # multipart): the same 422 as every other malformed request, as documented.
            return JSONResponse(
                {
                    "code": "invalid_body",
                    "message": f"the request body could not be read ({exc.detail}); send "
                    "UTF-8 JSON or multipart/form-data as /docs describes",
                },
                status_code=422,
            )
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"code": code, "message": str(exc.detail)}, status_code=exc.status_code)

    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        # A shared database restarting or out of reach: the client's to retry, not a bug.
        # Any other database error is unexpected (500).
        if not database_unreachable(exc):
            raise exc
        log.warning("%s %s: the database is unreachable", request.method, request.url.path)
        return JSONResponse(
            {
                "code": "database_unavailable",
                "message": "the database cannot be reached just now; try again shortly",
            },
            status_code=503,
            headers={"Retry-After": "5"},
        )

    for error in database_errors():
        app.add_exception_handler(error, _database_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The exception's text can hold SQL, paths or the user's data: it goes to the log
        # only, under an id the user can quote.
        incident = uuid.uuid4().hex[:12]
        log.error(
            "internal error %s on %s %s",
            incident,
            request.method,
            request.url.path,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return JSONResponse(
            {
                "code": "internal_error",
                "message": f"internal error; see the service log (error id {incident})",
            },
            status_code=500,
            # The server closes the connection after an unhandled error: say so, or a
            # client reusing it finds it reset.
            headers={"Connection": "close"},
        )


async def _load_models(host: ModelHost, worker: Worker) -> None:
    try:
        await host.load_all()
    except AipError as exc:
        log.error("%s", exc.message)
        return
    worker.start()


async def _warn_of_unknown_profiles(settings: Settings, profiles: Profiles) -> None:
    """A node limited to profiles no one has defined yet takes nothing until they are."""
    known = {profile.name for profile in await profiles.list()}
    for name in sorted(set(settings.worker_profiles) - known - {NO_PROFILE}):
        log.warning(
            "this node takes jobs of profile %r, which does not exist (yet); the profiles are: %s",
            name,
            ", ".join(sorted(known)) or "none",
        )


async def _expire_leases(queue: Queue) -> None:
    try:
        requeued, failed = await queue.recover(expired_only=True)
    except DiskFull:  # said by the queue, at most once a minute; tried again next time
        return
    if requeued or failed:
        log.warning("expired leases: %d jobs queued again, %d failed", requeued, failed)
    if not queue.sole_owner and await followup_store.recover(queue, expired_only=True):
        log.warning("expired leases: follow-up questions of a lost node queued again")


async def _apply_retention(queue: Queue, settings: Settings, age: float) -> None:
    report = await prune(
        queue,
        settings.data_dir,
        older_than_seconds=age,
        keep_results=settings.retention_keep_results,
        files=StoredFiles.of(settings, queue),
    )
    if report.images_removed or report.jobs_removed:
        log.info("retention %s: %s", settings.retention, report.to_dict())


def create_app(settings: Settings, *, host: ModelHost | None = None) -> FastAPI:
    """The app for `settings`. A `host` passed in is shared (tests) and not closed here."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.monotonic()
        lock = DataDirLock(settings.data_dir)
        lock.acquire()
        inbox = InboxSupervisor(settings)
        tasks: list[asyncio.Task[Any]] = []
        owned_host = host is None
        models = host or ModelHost.from_settings(settings)
        bus = EventBus()
        metrics.watch(bus, models)
        store: Store | None = None
        queue: Queue | None = None
        reads: Reads | None = None
        asked: FollowUps | None = None
        hooks: Webhooks | None = None
        node: NodeHeartbeat | None = None
        try:
            inbox.claim_local()
            await asyncio.to_thread(tighten, settings)
            await asyncio.to_thread(remove_unfinished_images, settings.images_dir)
            store = await open_store(settings)
            queue = store.queue
            # Nodes started from one configuration share an inbox path: one watches it, the
            # others serve without it (standby) rather than refuse to start.
            await inbox.claim_shared(store.url)
            requeued, failed = await queue.recover(expired_only=False)
            if requeued or failed:
                log.warning(
                    "recovered %d interrupted job%s: %d queued again, %d failed for good",
                    requeued + failed,
                    "" if requeued + failed == 1 else "s",
                    requeued,
                    failed,
                )
            reads = store.reads
            profiles = Profiles(queue, reads)
            for name in await profiles.seed(BUILTINS):
                log.warning("profile %r is yours: the shipped one is not installed", name)
            await _warn_of_unknown_profiles(settings, profiles)
            if await followup_store.recover(queue, expired_only=False):
                log.warning("follow-up questions interrupted by the last stop are queued again")
            asked = app.state.followups = FollowUps(
                settings, queue, models, reads, files=store.files
            )
            asked.start()
            # Started before the worker: what the last run left pending goes out first.
            # API nodes only, and on PostgreSQL one of them at a time (the sender lock): a
            # delivery is read as due, not claimed, so two senders would send it twice.
            if settings.serve_api:
                sender_lock = store.one_node_lock("aip webhook sender")
                hooks = app.state.webhooks = Webhooks(
                    settings, queue, reads, events=bus, sender_lock=sender_lock
                )
                hooks.start()
            models.events = bus
            worker = Worker(settings, queue, models, bus, files=store.files)
            store.on_job_queued(worker.notify)
            app.state.services = Services(
                settings,
                queue,
                reads,
                models,
                worker,
                started,
                profiles,
                events=bus,
                stored_files=store.files,
            )
            log.info(
                "aip %s started on %s; queue %s",
                __version__,
                store.where,
                await queue.counts(),
            )
            node = NodeHeartbeat(
                queue,
                worker,
                models,
                role="serve" if settings.serve_api else "worker",
                profiles=settings.worker_profiles,
            )
            await node.start()
            if models.ready:
                worker.start()
            else:
                tasks.append(asyncio.create_task(_load_models(models, worker)))
            tasks.append(
                asyncio.create_task(
                    every(
                        # A killed node's job is back in the queue within its lease time.
                        max(settings.lease_seconds / 4, 0.25),
                        lambda: _expire_leases(queue),
                        what="the lease check",
                        log=log,
                    )
                )
            )
            tasks.append(asyncio.create_task(models.keep_alive()))
            if settings.retention and settings.serve_api:  # one sweep per API node suffices
                age = parse_age(settings.retention)
                # The configured policy, applied at start and then hourly.
                retention = every(
                    3600,
                    lambda: _apply_retention(queue, settings, age),
                    what="retention",
                    log=log,
                    at_start=True,
                )
                tasks.append(asyncio.create_task(retention))
            inbox.start(
                lambda: InboxWatcher(
                    settings, Ledger(queue), worker.notify, profiles, bus, files=store.files
                ),
                app.state.services,
            )
            if (supervisor := inbox.supervise()) is not None:
                tasks.append(supervisor)
            yield
            asked.stop_claiming()  # at once: the grace is for the running job and follow-up
            try:
                await inbox.stop()
            finally:
                await worker.stop()
            log.info("aip stopped; queue %s", await queue.counts())
        finally:
            if asked is not None:
                await asked.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if node is not None:  # after the worker: it ran its last job
                await node.stop()
            if hooks is not None:
                await hooks.stop()
            if store is not None:
                await store.close()
            if owned_host:
                await models.close()
            inbox.release()
            lock.release()

    app = FastAPI(
        title="aerial-intelligence-pipeline",
        version=__version__,
        description="Local-first visual AI jobs: Falcon Perception detection, then Gemma 4 "
        "reasoning, persisted in SQLite.",
        lifespan=lifespan,
        # Served by docs_api from a package, behind the token when one is set: no CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # The browser guard runs before every route: each one can answer its 403.
        responses=BrowserGuard.responses,
    )
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    # Added after the body limit, so it runs before it: a foreign Host or Origin never
    # reaches a route.
    app.add_middleware(BrowserGuard, settings=settings)
    # Outermost: the guard's refusals are timed too.
    metrics = app.state.metrics = Metrics()
    app.add_middleware(RequestMetrics, metrics=metrics)
    _install_error_handlers(app)
    app.include_router(health.router, prefix="/v1")
    app.include_router(events_api.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(inbox.router, prefix="/v1")
    app.include_router(models_api.router, prefix="/v1")
    app.include_router(nodes_api.router, prefix="/v1")
    app.include_router(flights_api.router, prefix="/v1")
    app.include_router(history.router, prefix="/v1")
    app.include_router(followups_api.router, prefix="/v1")
    app.include_router(profiles_api.router, prefix="/v1")
    app.include_router(metrics_api.router)
    docs_api.install(app)
    pages.install(app)
    return app
