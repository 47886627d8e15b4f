"""The model thread: one daemon thread that runs every call touching the accelerator, in the
order submitted, and hands results back to whichever event loop asked. Knows no models."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from service.models.mlx_runtime import release_thread_streams

T = TypeVar("T")


class ModelThread:
    """One daemon thread that runs submitted calls in order (an accelerator wants one owner).

    A daemon, so a shutdown that gives up on a long inference is not held hostage by it."""

    def __init__(self, name: str = "aip-models") -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                release_thread_streams()
                return
            fn, loop, future = item
            try:
                outcome: tuple[Any, BaseException | None] = (fn(), None)
            except BaseException as exc:
                outcome = (None, exc)
            # The caller's loop may have closed meanwhile (shutdown gave up on this call).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, *outcome)
            del fn, item, outcome  # hold nothing (a freed model) while waiting for the next call

    async def run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((fn, loop, future))
        return await future

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued calls, release the thread's MLX streams and end the thread."""
        self._calls.put(None)
        self._thread.join(timeout)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
