"""The in-process event bus: what happened to jobs, models and the inbox, kept for a few minutes
and fanned out to subscribers. It knows nothing of HTTP, the store or the models."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("aip.events")

TYPES = frozenset(
    {
        "job.created",
        "job.claimed",
        "job.stage",
        "job.text",
        "job.succeeded",
        "job.failed",
        "job.cancelled",
        "job.retrying",
        "model.progress",
        "model.loaded",
        "model.unloaded",
        "inbox.filed",
        "inbox.rejected",
        "webhook.delivered",
        "webhook.failed",
    }
)
# The terminal job events: a client waiting on one job stops at the first of these.
FINISHED = frozenset({"job.succeeded", "job.failed", "job.cancelled"})

KEEP_SECONDS = 600.0
KEEP_EVENTS = 10_000
# Events one subscriber may hold unread before it is dropped: a stalled client must cost a
# bounded amount of memory and never slow the publisher.
BUFFER_EVENTS = 2_000


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    job_id: int | None
    data: dict[str, Any]
    at: float


def _matches(event: Event, job_id: int | None) -> bool:
    return job_id is None or event.job_id == job_id


class Subscription:
    """Kept events after a given id, then live ones, as an async iterator. Ends when closed or
    when it fell more than its buffer behind (`dropped` says which)."""

    def __init__(self, bus: EventBus, job_id: int | None, limit: int) -> None:
        self.job_id = job_id
        self.limit = limit
        self.dropped = False
        # True when the id resumed from was older than anything kept: events may be missing.
        self.gap = False
        self._bus = bus
        self._buffer: deque[Event] = deque()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def drain(self, limit: int) -> list[Event]:
        """Up to `limit` events already waiting, without waiting for more."""
        taken: list[Event] = []
        while self._buffer and len(taken) < limit:
            taken.append(self._buffer.popleft())
        return taken

    def close(self) -> None:
        self._bus._remove(self)
        self._end()

    def _offer(self, event: Event) -> bool | None:
        """Called under the bus lock: True when the reader must be woken, None when not,
        False when this subscriber fell too far behind and must be dropped."""
        if len(self._buffer) >= self.limit:
            return False
        self._buffer.append(event)
        return True if len(self._buffer) == 1 else None

    def _drop(self) -> None:
        self.dropped = True
        self._buffer.clear()
        self._end()

    def _end(self) -> None:
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        _wake_all([self])


def _wake_all(subs: list[Subscription]) -> None:
    """Wake readers: at once on their loop's own thread, else with one call per loop (the
    model thread publishes a text piece per token, to every reader)."""
    here = threading.get_ident()
    elsewhere: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for sub in subs:
        if sub._loop_thread == here:
            sub._wake.set()
        else:
            elsewhere.setdefault(sub._loop, []).append(sub._wake)
    for loop, wakes in elsewhere.items():
        try:
            loop.call_soon_threadsafe(_set_all, wakes)
        except RuntimeError:  # that loop is closed: nobody reads there any more
            continue


def _set_all(wakes: list[asyncio.Event]) -> None:
    for wake in wakes:
        wake.set()


@dataclass
class EventBus:
    keep_seconds: float = KEEP_SECONDS
    keep_events: int = KEEP_EVENTS
    buffer_events: int = BUFFER_EVENTS
    clock: Callable[[], float] = time.time
    _ring: deque[Event] = field(init=False)
    _subscribers: set[Subscription] = field(init=False, default_factory=set)
    _listeners: list[Callable[[Event], None]] = field(init=False, default_factory=list)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _next_id: int = field(init=False)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._ring = deque(maxlen=self.keep_events)
        # Seeded from the boot time in microseconds: ids keep increasing across restarts, so a
        # client resuming with an id from the last run gets this run's events, not silence.
        self._next_id = int(self.clock() * 1_000_000)

    def publish(
        self, type: str, data: dict[str, Any] | None = None, *, job_id: int | None = None
    ) -> Event:
        """Record and fan out one event. Thread-safe; never blocks on a subscriber and never
        raises into the caller (a failing listener is logged and skipped)."""
        with self._lock:
            now = self.clock()
            event = Event(self._next_id, type, job_id, dict(data or {}), now)
            self._next_id += 1
            self._ring.append(event)
            horizon = now - self.keep_seconds
            while self._ring and self._ring[0].at < horizon:
                self._ring.popleft()
            waking, dropped = [], []
            for sub in self._subscribers:
                if _matches(event, sub.job_id):
                    offered = sub._offer(event)
                    if offered:
                        waking.append(sub)
                    elif offered is False:
                        dropped.append(sub)
            for sub in dropped:
                self._subscribers.discard(sub)
                sub._drop()
            listeners = list(self._listeners)
        if waking:
            _wake_all(waking)
        if dropped:
            log.info("dropped %d event client(s) that fell behind", len(dropped))
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed on %s", listener, event.type)
        return event

    def subscribe(self, *, job_id: int | None = None, after: int | None = None) -> Subscription:
        """Kept events with id > `after` (none when `after` is None), then live ones. Call from
        the event loop the subscriber reads on."""
        sub = Subscription(self, job_id, self.buffer_events)
        with self._lock:
            if self._closed:
                sub._end()
                return sub
            if after is not None:
                kept = [e for e in self._ring if e.id > after and _matches(e, job_id)]
                # Ids within a run are consecutive: a first kept id past after + 1 means the
                # events between were pruned (or belonged to an earlier run).
                first = self._ring[0].id if self._ring else self._next_id
                sub.gap = first > after + 1 or len(kept) > self.buffer_events
                sub._buffer.extend(kept[-self.buffer_events :])
            self._subscribers.add(sub)
        return sub

    def on(self, callback: Callable[[Event], None]) -> None:
        """An in-process listener, called on the publisher's thread: keep it quick."""
        with self._lock:
            self._listeners.append(callback)

    def close(self) -> None:
        """End every subscription, and any made later, at once: a server waits for open
        streams before it stops. Publishing and listeners go on."""
        with self._lock:
            self._closed = True
            ending, self._subscribers = self._subscribers, set()
        for sub in ending:
            sub._end()

    @property
    def listeners(self) -> int:
        return len(self._subscribers)

    def kept(self) -> list[Event]:
        with self._lock:
            return list(self._ring)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)
