"""The webhook sender: POSTs each due delivery (the finished job's JSON, as GET /v1/jobs/{id}
shows it, signed with HMAC-SHA256) to its URL and records the outcome, retrying with backoff
for up to a day. It runs beside the worker, never in its way: deliveries live in the database
(service/store/webhooks.py), so whatever stops the process, the next start sends what is left.
It knows HTTP and delivery rows, not how a job runs or ends."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx

from service import __version__
from service.api.schemas import Job
from service.config import Settings
from service.errors import NotFound
from service.events import FINISHED, Event, EventBus
from service.policy import backoff_seconds
from service.store import webhooks as store
from service.store.queue import Queue
from service.store.reads import Reads

if TYPE_CHECKING:
    from service.store.postgres.advisory import AdvisoryLock

log = logging.getLogger("aip.webhooks")

MAX_IN_FLIGHT = 8  # deliveries being sent at once
TIMEOUT_SECONDS = 10.0  # to connect, and between bytes of the answer
DEADLINE_SECONDS = 30.0  # for a whole attempt: a receiver trickling bytes holds no slot longer
RETRY_CAP_SECONDS = 3600.0  # the longest wait between two attempts
# How long the sender lets attempts in flight finish at shutdown; the rest are sent again at
# the next start (with the same delivery id).
STOP_GRACE_SECONDS = 5.0
SIGNATURE = "X-AIP-Signature"


def sign(secret: str, body: bytes) -> str:
    """The X-AIP-Signature value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body_of(job: dict[str, Any]) -> bytes:
    """The job as GET /v1/jobs/{id} writes it: a finished job has no queue place or stage."""
    view = {**job, "queue_position": None, "stage": None}
    return Job.model_validate(view).model_dump_json(exclude_unset=True).encode()


def retry_at(delivery: store.Delivery, now: float, *, base: float, window: float) -> float | None:
    """When to try `delivery` again after its failed attempt number `attempts + 1`; None once
    that falls past `window` seconds after its job ended."""
    at = now + backoff_seconds(delivery.attempts + 1, base=base, cap=RETRY_CAP_SECONDS)
    return at if at <= delivery.created_at + window else None


class Webhooks:
    """Sends due deliveries, at most MAX_IN_FLIGHT at once; woken by finished jobs' events,
    and between them by the next delivery falling due or the poll interval."""

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        reads: Reads,
        *,
        events: EventBus | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sender_lock: AdvisoryLock | None = None,
    ) -> None:
        """`sender_lock`: nodes sharing a PostgreSQL database send through whichever holds it,
        so no delivery goes out twice at once."""
        self.settings = settings
        self._sender_lock = sender_lock
        self._queue = queue
        self._reads = reads
        self._events = events
        self._clock = clock
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=TIMEOUT_SECONDS,
            follow_redirects=False,  # only URLs the user configured are ever called
            limits=httpx.Limits(max_connections=MAX_IN_FLIGHT),
            headers={"User-Agent": f"aip/{__version__}"},
        )
        self._sending: dict[str, asyncio.Task[None]] = {}
        # Deliveries whose outcome could not be written: not picked again before this time.
        self._resting: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if events is not None:
            events.on(self._on_event)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="aip-webhooks")

    def nudge(self) -> None:
        """Look for due deliveries now. Safe from any thread."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the sender is gone
            loop.call_soon_threadsafe(self._wake.set)

    def _on_event(self, event: Event) -> None:
        if event.type in FINISHED:
            self.nudge()

    async def stop(self) -> None:
        """Stop picking deliveries, give those in flight STOP_GRACE_SECONDS, cancel the rest
        (their rows stay due: the next start sends them again)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        in_flight = list(self._sending.values())
        if in_flight:
            _, late = await asyncio.wait(in_flight, timeout=STOP_GRACE_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._client.aclose()
        if self._sender_lock is not None:
            await asyncio.to_thread(self._sender_lock.release)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                wait = await self._dispatch()
            except Exception:
                log.exception("webhooks: reading the due deliveries failed")
                wait = self.settings.poll_interval_seconds
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.0))

    async def _dispatch(self) -> float:
        """Start sending what is due and there is room for; returns how long to sleep."""
        poll = self.settings.poll_interval_seconds
        if self._sender_lock is not None and not await asyncio.to_thread(self._sender_lock.acquire):
            return poll  # another node sends them
        now = self._clock()
        self._resting = {k: t for k, t in self._resting.items() if t > now}
        room = MAX_IN_FLIGHT - len(self._sending)
        if room <= 0:
            return poll  # a send finishing wakes the loop sooner
        busy = {*self._sending, *self._resting}
        found, later = await store.due(self._reads, now, room, busy)
        for delivery in found:
            task = asyncio.create_task(self._send(delivery), name=f"aip-webhook-{delivery.id}")
            self._sending[delivery.id] = task
            task.add_done_callback(partial(self._done, delivery.id))
        return poll if later is None else min(poll, later - self._clock())

    def _done(self, delivery_id: str, _: asyncio.Task[None]) -> None:
        self._sending.pop(delivery_id, None)
        self._wake.set()

    async def _send(self, delivery: store.Delivery) -> None:
        try:
            await self._attempt(delivery)
        except Exception:
            # Not recorded (the database refused a read or a write): it stays due and is sent
            # again under the same delivery id, after a rest rather than at once.
            log.exception("webhooks: delivery %s of job %d", delivery.id, delivery.job_id)
            rest = max(self.settings.poll_interval_seconds, 5.0)
            self._resting[delivery.id] = self._clock() + rest

    async def _attempt(self, delivery: store.Delivery) -> None:
        later: float | None = None
        error: str | None
        try:
            job = await self._reads.job(delivery.job_id)
        except NotFound:  # pruned since it was found due: nothing is left to send
            http_status, error, gone = None, "the job no longer exists", True
        else:
            http_status, error = await self._post(delivery, body_of(job))
            gone = False
        now = self._clock()
        if error is not None and not gone:
            later = retry_at(
                delivery,
                now,
                base=self.settings.webhook_retry_base_seconds,
                window=self.settings.webhook_retry_for_seconds,
            )
        status = await store.record(
            self._queue, delivery, now=now, http_status=http_status, error=error, retry_at=later
        )
        if status is not None:
            self._report(delivery, status, http_status, error)

    async def _post(self, delivery: store.Delivery, body: bytes) -> tuple[int | None, str | None]:
        """One attempt: (the HTTP status, if answered; None when delivered, else why not)."""
        headers = {
            "Content-Type": "application/json",
            "X-AIP-Delivery": delivery.id,
            "X-AIP-Event": delivery.event,
        }
        if self.settings.webhook_secret:
            headers[SIGNATURE] = sign(self.settings.webhook_secret, body)
        try:
            # Streamed and closed unread: a receiver's answer body is not ours to hold.
            async with (
                asyncio.timeout(DEADLINE_SECONDS),
                self._client.stream("POST", delivery.url, content=body, headers=headers) as answer,
            ):
                status = answer.status_code
        except TimeoutError:
            return None, f"no answer within {DEADLINE_SECONDS:g} s"
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}".rstrip(": ")
        except (httpx.InvalidURL, ValueError) as exc:  # e.g. a host name IDNA refuses
            return None, f"the URL cannot be used: {exc}"
        if 200 <= status < 300:
            return status, None
        if 300 <= status < 400:
            return status, f"HTTP {status}: redirects are not followed; configure the final URL"
        return status, f"HTTP {status}"

    def _report(
        self, delivery: store.Delivery, status: str, http_status: int | None, error: str | None
    ) -> None:
        attempts = delivery.attempts + 1
        if status == "failed":
            log.warning(
                "webhook for job %d to %s failed for good after %d attempts: %s",
                delivery.job_id,
                delivery.url,
                attempts,
                error,
            )
        if self._events is None:
            return
        data = {
            "delivery_id": delivery.id,
            "url": delivery.url,
            "attempts": attempts,
            "status": http_status,
        }
        if error is None:
            self._events.publish("webhook.delivered", data, job_id=delivery.job_id)
        else:
            data.update(error=error, final=status == "failed")
            self._events.publish("webhook.failed", data, job_id=delivery.job_id)
