"""This process as a node of the service: registered in the store at start, a heartbeat every
few seconds (the job it runs, the jobs it has done, its models), marked stopped on a clean
shutdown, so GET /v1/nodes shows who works the queue. Knows the worker and the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING

from service.store import nodes as store
from service.store.queue import Queue

if TYPE_CHECKING:
    from service.models.host import ModelHost
    from service.worker import Worker

log = logging.getLogger("aip.nodes")


def new_node_id() -> str:
    """`host:pid:random`: unique per process start; the worker's lease owner is this id."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class NodeHeartbeat:
    """Registers `worker.id` as a node of `role`, then beats every `interval` seconds."""

    def __init__(
        self,
        queue: Queue,
        worker: Worker,
        host: ModelHost,
        *,
        role: str,
        profiles: tuple[str, ...] = (),
        interval: float = store.HEARTBEAT_SECONDS,
    ) -> None:
        self.queue = queue
        self.worker = worker
        self.host = host
        self.interval = interval
        self.node = store.Node(
            id=worker.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            role=role,
            models=host.identity(),
            profiles=profiles or None,
        )
        self._task: asyncio.Task[None] | None = None
        self._failed_logged = float("-inf")

    @property
    def id(self) -> str:
        return self.node.id

    async def start(self) -> None:
        await store.register(self.queue, self.node)
        self._task = asyncio.create_task(self._run(), name="aip-node-heartbeat")

    def _state(self) -> store.Beat:
        current = self.worker.current
        return store.Beat(
            current_job=current.job_id if current is not None else None,
            jobs_done=self.worker.jobs_done,
            models=self.host.identity(),
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                if not await store.beat(self.queue, self.id, self._state()):
                    await store.register(self.queue, self.node)
            except Exception:  # the database is away: the next beat tries again
                if time.monotonic() - self._failed_logged >= 60:
                    self._failed_logged = time.monotonic()
                    log.exception("node %s: heartbeat failed", self.id)

    async def stop(self) -> None:
        """Stop beating and mark the node stopped (a failure is logged: the node then shows
        as lost once its beats are late, which is true enough)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            await store.stop(self.queue, self.id, self.worker.jobs_done)
        except Exception:
            log.exception("node %s: marking it stopped failed", self.id)
