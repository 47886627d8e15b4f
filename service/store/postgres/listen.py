"""A thread that LISTENs on one PostgreSQL channel and calls back on the event loop for each
notification; it reconnects when the connection drops (a missed wake-up costs one poll)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import psycopg

log = logging.getLogger("aip.store")

JOBS_CHANNEL = "aip_jobs"  # migrations/postgres/0002_wake.sql notifies it
RECONNECT_S = 1.0


class Listener:
    def __init__(self, url: str, channel: str, callback: Callable[[], None]) -> None:
        self._url = url
        self._channel = channel
        self._callback = callback
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aip-db-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f'LISTEN "{self._channel}"')
                    self._wake()  # what was notified while no connection listened
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._wake()
            except psycopg.Error as exc:
                log.warning("listening for new jobs failed (%s); polling until it is back", exc)
                self._stop.wait(RECONNECT_S)

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._callback)
        except RuntimeError:  # the loop is closed: the service is stopping
            self._stop.set()
