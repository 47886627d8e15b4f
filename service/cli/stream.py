"""The service's event stream (GET /v1/events) for shell clients: read on a thread, parsed into
dicts, resumed after the last id seen when the connection drops. A service without the stream,
or one that cannot be reached again, makes the caller fall back to polling."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from service.client import Client

RECONNECTS = 3
_ENDED: dict[str, Any] = {}  # put on the queue when the stream is gone for good


class StreamEnded(Exception):
    """The stream closed and could not be resumed: poll instead."""


def parse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Events from the stream's lines (`data` is the whole event as JSON); comments skipped."""
    data: str | None = None
    for line in lines:
        if not line:
            if data is not None:
                try:
                    event = json.loads(data)
                except ValueError:
                    event = None
                if isinstance(event, dict) and "type" in event:
                    yield event
            data = None
        elif line.startswith("data:"):
            data = line[5:].removeprefix(" ")


class EventStream:
    """One open stream; `next(timeout)` gives the next event, or None when none came in time."""

    def __init__(self, response: httpx.Response, http: httpx.Client) -> None:
        self._response: httpx.Response | None = response
        self._http = http
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._last: int | None = None
        self._closing = False
        threading.Thread(target=self._read, daemon=True, name="aip-events").start()

    @classmethod
    def open(cls, client: Client) -> EventStream | None:
        """Subscribed once this returns (nothing published later is missed); None when the
        service offers no stream."""
        http = httpx.Client(
            base_url=client.url,
            headers=client.http.headers,
            timeout=httpx.Timeout(10.0, read=60.0),  # heartbeats come every 15 s
        )
        response = _connect(http, None)
        if response is None:
            http.close()
            return None
        return cls(response, http)

    def next(self, timeout: float) -> dict[str, Any] | None:
        try:
            event = self._events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if event is _ENDED:
            raise StreamEnded
        return event

    def close(self) -> None:
        # The reader thread ends at the next line or heartbeat; the process may exit first.
        self._closing = True

    def _read(self) -> None:
        failures = 0
        while not self._closing:
            response = self._response
            self._response = None
            if response is None:
                response = _connect(self._http, self._last)
            if response is None:
                failures += 1
                if failures > RECONNECTS:
                    break
                time.sleep(0.5 * failures)
                continue
            try:
                for event in parse(response.iter_lines()):
                    failures = 0
                    self._last = event.get("id", self._last)
                    self._events.put(event)
                    if self._closing:
                        break
            except (httpx.HTTPError, OSError):
                pass
            finally:
                response.close()
        self._events.put(_ENDED)
        self._http.close()


def _connect(http: httpx.Client, after: int | None) -> httpx.Response | None:
    headers = {"Last-Event-ID": str(after)} if after is not None else {}
    try:
        response = http.send(http.build_request("GET", "/v1/events", headers=headers), stream=True)
    except (httpx.HTTPError, OSError):
        return None
    kind = response.headers.get("content-type", "")
    if response.status_code != 200 or not kind.startswith("text/event-stream"):
        response.close()
        return None
    return response
