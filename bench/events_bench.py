"""Events fan-out benchmark (issue 14's row): job throughput of a burst while 100 clients hold
GET /v1/events open and read every event, against the same burst with no client connected,
interleaved, on the tiny checkpoints in a service process of its own.

    .venv/bin/python -m bench.events_bench [--quick]

The clients are plain sockets that read and count (what a dashboard's EventSource costs the
service, not what parsing costs this process); they run in this process, on the same cores.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httpx

from bench import idle_service
from bench.overhead_bench import CHECKPOINTS, QUERIES, _frame, _service_rate, _wait_ready
from bench.table import Row, compare, interleaved, main_for, median

CLIENTS = 100
PROMPT = "Describe."  # the tiny reasoner answers this with text: job.text events flow too


class Reader:
    """One event-stream client: a socket that reads everything and counts the events."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0
        self.ended = False
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer = writer
        writer.write(b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the event stream refused a client: {head[:80]!r}")
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self.bytes += len(chunk)
            self.events += chunk.count(b"\nevent: ")
        self.ended = True

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _with_clients(url: str, images: list[bytes], seen: dict[str, list[float]]) -> float:
    port = httpx.URL(url).port
    assert port is not None
    readers = [Reader() for _ in range(CLIENTS)]
    await asyncio.gather(*(r.connect(port) for r in readers))
    await asyncio.sleep(0.5)  # connected and idle: the burst meets clients, not a connect storm
    try:
        rate = await _service_rate(url, images, prompt=PROMPT)
        await asyncio.sleep(0.2)  # the last events on their way
    finally:
        await asyncio.gather(*(r.close() for r in readers))
    seen["events"].append(median(r.events for r in readers))
    seen["dropped"].append(sum(r.ended for r in readers))
    return rate


def run(quick: bool) -> list[Row]:
    from service.models import tiny

    jobs, rounds, tokens = (6, 3, 16) if quick else (16, 5, 24)
    detector, reasoner = tiny.build_checkpoints(CHECKPOINTS / "tiny", "tiny")
    counter = iter(range(10**6))
    batch = lambda: [_frame(next(counter)) for _ in range(jobs)]  # noqa: E731
    loop = asyncio.new_event_loop()
    seen: dict[str, list[float]] = {"events": [], "dropped": []}
    work = Path(tempfile.mkdtemp(prefix="aip-bench-events-"))
    try:
        with idle_service.running(work, (detector, reasoner, tokens)) as url:
            _wait_ready(url)
            loop.run_until_complete(_service_rate(url, [_frame(10**5)], prompt=PROMPT))  # warm-up
            samples = interleaved(
                {
                    "ours": lambda: loop.run_until_complete(_with_clients(url, batch(), seen)),
                    "none": lambda: loop.run_until_complete(
                        _service_rate(url, batch(), prompt=PROMPT)
                    ),
                },
                rounds,
            )
    finally:
        loop.close()
    return [
        compare(
            f"job throughput with {CLIENTS} event-stream clients vs none (tiny checkpoints)",
            median(samples["ours"]),
            median(samples["none"]),
            unit="jobs/s",
            at_least=0.95,
            note=f"bursts of {jobs} 640×480 JPEGs, {len(QUERIES)} queries, {tokens} reasoning "
            f"tokens, {rounds} rounds interleaved; every client read every event (median "
            f"{median(seen['events']):.0f} per client per burst; clients the service dropped: "
            f"{max(seen['dropped']):.0f}); clients in this process, the service in its own, "
            "same cores",
        )
    ]


if __name__ == "__main__":
    main_for("events", run, __doc__)
