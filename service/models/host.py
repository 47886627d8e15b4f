"""The model host: the one owner of both models. Loads, reports and frees them, and runs every
inference on its single dedicated thread, off the event loop, one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from service.errors import ModelUnavailable
from service.models.mlx_runtime import release_thread_streams
from service.models.sources import ROLES, bytes_on_disk, go_offline, resolve, revision_of

log = logging.getLogger("aip.models")
T = TypeVar("T")
Loader = Callable[[Path], Any]


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


@dataclass
class RoleState:
    role: str
    source: str
    state: str = "unloaded"  # unloaded | loading | loaded | failed
    path: Path | None = None
    revision: str | None = None
    bytes_on_disk: int | None = None
    load_seconds: float | None = None
    loaded_at: float | None = None
    jobs_served: int = 0
    error: str | None = None
    runtime: Any = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "source": self.source,
            "path": str(self.path) if self.path else None,
            "state": self.state,
            "revision": self.revision,
            "bytes_on_disk": self.bytes_on_disk,
            "load_seconds": round(self.load_seconds, 3) if self.load_seconds else None,
            "jobs_served": self.jobs_served,
            "error": self.error,
        }

    def identity(self) -> dict[str, Any]:
        return {"id": self.source, "revision": self.revision}


def default_loaders() -> dict[str, Loader]:
    from service.models import falcon, gemma

    return {"detector": falcon.load, "reasoner": gemma.load}


class ModelHost:
    def __init__(
        self,
        sources: dict[str, str],
        *,
        loaders: dict[str, Loader] | None = None,
        resolve_sources: bool = True,
    ) -> None:
        """`loaders` and `resolve_sources=False` let tests host stand-in models."""
        self.roles = {role: RoleState(role, sources[role]) for role in ROLES}
        self._resolve = resolve_sources
        self._loaders = loaders
        self._thread = ModelThread()

    @property
    def ready(self) -> bool:
        return all(state.state == "loaded" for state in self.roles.values())

    def describe(self) -> list[dict[str, Any]]:
        return [state.describe() for state in self.roles.values()]

    def identity(self) -> dict[str, Any]:
        return {role: state.identity() for role, state in self.roles.items()}

    async def load_all(self) -> None:
        """Resolve and load both roles; a failure is kept on the role and raised."""
        for role in ROLES:
            await self.load(role)

    async def load(self, role: str) -> None:
        state = self.roles[role]
        state.state, state.error = "loading", None
        began = time.perf_counter()
        try:
            # Downloads happen before start (`aip serve`, `aip models pull`), never here.
            path = (
                await asyncio.to_thread(resolve, role, state.source, allow_download=False)
                if self._resolve
                else Path(state.source)
            )
            go_offline()
            if self._loaders is None:
                self._loaders = await self._thread.run(default_loaders)
            loader = self._loaders[role]
            runtime = await self._thread.run(lambda: loader(path))
        except ModelUnavailable as exc:
            state.state, state.error = "failed", exc.message
            raise
        except Exception as exc:
            state.state, state.error = "failed", f"{type(exc).__name__}: {exc}"
            raise ModelUnavailable(
                f"the {role} model {state.source!r} failed to load: {state.error}",
                code="model_load_failed",
            ) from exc
        state.runtime, state.path = runtime, path
        state.revision, state.bytes_on_disk = revision_of(path), bytes_on_disk(path)
        state.load_seconds = time.perf_counter() - began
        state.loaded_at, state.state = time.time(), "loaded"
        log.info(
            "loaded %s %s (revision %s) in %.1f s",
            role,
            state.source,
            state.revision,
            state.load_seconds,
        )

    async def infer(self, fn: Callable[[Any, Any], T]) -> T:
        """Run `fn(detector, reasoner)` on the model thread."""
        if not self.ready:
            raise ModelUnavailable("models are not loaded yet", code="models_loading")
        detector = self.roles["detector"].runtime
        reasoner = self.roles["reasoner"].runtime
        try:
            return await self._thread.run(lambda: fn(detector, reasoner))
        finally:
            for state in self.roles.values():
                state.jobs_served += 1

    async def close(self) -> None:
        for state in self.roles.values():
            state.runtime, state.state = None, "unloaded"
        await asyncio.to_thread(self._thread.close)
