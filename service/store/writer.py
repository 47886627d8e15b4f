"""The writer: one long-lived database connection owned by one thread, which runs each whole
transaction as one function (one hop from the event loop per transaction); it knows SQL
transactions, not jobs.

Concurrent writes waiting together (intake, and the worker's claims and attempt endings) are
group-committed: one transaction, each in its own SAVEPOINT (one caller's error undoes only its
own work), one COMMIT (one fsync), and only then is each caller answered. A write whose caller
is cancelled still runs to its end on the thread, so it lands whole or not at all and the
connection never stays inside a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from service.store.db import Db

T = TypeVar("T")

# A group larger than this commits and the rest start the next group: a bound on how long the
# first caller of a burst waits for the others' statements.
MAX_GROUP = 256

_Settled = list[tuple["asyncio.Future[Any]", Any, BaseException | None]]


@dataclass
class _Call:
    fn: Callable[[Db], Any]
    future: asyncio.Future[Any]
    transaction: bool
    group: bool


class Writer:
    def __init__(self, conn: Db, *, name: str = "aip-db-writer") -> None:
        """`conn` must be in autocommit mode (isolation_level=None) and usable from the
        writer thread (check_same_thread=False); from here on only that thread uses it."""
        self._conn = conn
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closed = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def in_transaction(self) -> bool:
        """Whether the connection is inside a transaction (between calls: never)."""
        return self._conn.in_transaction

    async def run(self, fn: Callable[[Db], T], *, group: bool = False) -> T:
        """`fn(conn)` inside BEGIN IMMEDIATE ... COMMIT on the writer thread; its result once
        committed. Any error rolls the whole transaction back and is raised here. With
        `group`, it may share its transaction and COMMIT with other group calls waiting at
        the same time (in its own SAVEPOINT); a failed COMMIT fails every one of them."""
        return await self._submit(fn, transaction=True, group=group)

    async def read(self, fn: Callable[[Db], T]) -> T:
        """`fn(conn)` on the writer thread outside any transaction: a read that sees every
        commit so far (or a single autocommit statement)."""
        return await self._submit(fn, transaction=False, group=False)

    async def _submit(self, fn: Callable[[Db], T], *, transaction: bool, group: bool) -> T:
        if self._closed:
            raise RuntimeError("the database writer is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.put(_Call(fn, future, transaction, group))
        # Cancelling the caller cancels this wait only: the call itself runs to its end.
        return await future

    async def close(self) -> None:
        """Finish the calls already queued, then close the connection."""
        if not self._closed:
            self._closed = True
            self._calls.put(None)
        await asyncio.to_thread(self._stopped.wait)

    # -- the writer thread ------------------------------------------------------------------

    def _serve(self) -> None:
        pending: deque[_Call | None] = deque()
        try:
            while True:
                if not pending:
                    pending.append(self._calls.get())
                with contextlib.suppress(queue.Empty):
                    while True:
                        pending.append(self._calls.get_nowait())
                call = pending.popleft()
                if call is None:
                    return
                batch = [call]
                while call.group and pending and len(batch) < MAX_GROUP:
                    nxt = pending[0]
                    if nxt is None or not nxt.group:
                        break
                    batch.append(nxt)
                    pending.popleft()
                if len(batch) > 1:
                    self._settle(self._run_group(batch))
                else:
                    self._settle(self._run_one(call))
        finally:
            self._conn.close()
            self._stopped.set()
            # Nothing queued after the close may wait forever.
            with contextlib.suppress(queue.Empty):
                while True:
                    pending.append(self._calls.get_nowait())
            closed = RuntimeError("the database writer is closed")
            self._settle([(c.future, None, closed) for c in pending if c is not None])

    def _run_one(self, call: _Call) -> _Settled:
        conn = self._conn
        try:
            if call.transaction:
                conn.execute("BEGIN IMMEDIATE")
            result = call.fn(conn)
            if call.transaction:
                conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            return [(call.future, None, exc)]
        return [(call.future, result, None)]

    def _run_group(self, batch: list[_Call]) -> _Settled:
        conn = self._conn
        settled: _Settled = []
        members: list[tuple[_Call, Any]] = []  # done, in the open transaction, not committed
        for call in batch:
            try:
                if not conn.in_transaction:
                    conn.execute("BEGIN IMMEDIATE")
                conn.execute("SAVEPOINT member")
                result = call.fn(conn)
                conn.execute("RELEASE member")
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK TO member")
                    conn.execute("RELEASE member")
                settled.append((call.future, None, exc))
                if not conn.in_transaction:
                    # SQLite ended the whole transaction (a full disk, an I/O error): the
                    # members before this one went with it.
                    settled.extend((m.future, None, exc) for m, _ in members)
                    members = []
                continue
            members.append((call, result))
        if members:
            try:
                conn.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                settled.extend((m.future, None, exc) for m, _ in members)
            else:
                settled.extend((m.future, result, None) for m, result in members)
        else:
            self._rollback()
        return settled

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(Exception):
                self._conn.execute("ROLLBACK")

    @staticmethod
    def _settle(settled: _Settled) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, _Settled] = {}
        for entry in settled:
            by_loop.setdefault(entry[0].get_loop(), []).append(entry)
        for loop, entries in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_resolve, entries)


def _resolve(entries: _Settled) -> None:
    for future, result, exc in entries:
        if future.done():  # its caller was cancelled; the call ran all the same
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
