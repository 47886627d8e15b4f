"""Runs the app under uvicorn and gives stop signals their meaning for the worker: the first
(Ctrl-C or SIGTERM) lets the running job finish within the grace period and says so; a second
hands the job back to the queue and exits at once. Knows uvicorn and the worker, no routes."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn

# The shell's status for a process ended by Ctrl-C (128 + SIGINT).
INTERRUPTED = 128 + signal.SIGINT


class _CutOffRequests(logging.Filter):
    """A request still in flight when a forced exit ends the event loop is cancelled: that is
    the stop the user asked for, not an error worth a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


class Server(uvicorn.Server):
    """uvicorn's server, telling the worker of `app` (the app create_app made) about each
    stop signal."""

    def __init__(self, config: uvicorn.Config, app: object) -> None:
        super().__init__(config)
        self._app = app
        self.interrupted_twice = False
        logging.getLogger("uvicorn.error").addFilter(_CutOffRequests())

    @property
    def exit_status(self) -> int:
        """0 for a stop that was asked for (SIGTERM, Ctrl-C); 130 when a second Ctrl-C cut
        the wait for the running job short."""
        return INTERRUPTED if self.interrupted_twice else 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        again = self.should_exit
        self.interrupted_twice |= again and sig == signal.SIGINT
        state = getattr(self._app, "state", None)
        worker = getattr(getattr(state, "services", None), "worker", None)
        if worker is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:  # a signal handler must not log or touch the loop itself
                loop.call_soon_threadsafe(worker.stop_signalled, again)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        # Event streams never end by themselves, and uvicorn waits for every open response.
        services = getattr(getattr(self._app, "state", None), "services", None)
        events = getattr(services, "events", None)
        if events is not None:
            events.close()
        await super().shutdown(sockets)
        # uvicorn skips the app's shutdown on a forced exit (Ctrl-C twice). Ours must still
        # run: it hands the running job back and closes the database, without waiting now.
        done = getattr(self.lifespan, "shutdown_event", None)
        if self.force_exit and done is not None and not done.is_set():
            await self.lifespan.shutdown()
