"""Inbox benchmark: latency from "file finished" to "job queued", and the ingest rate of a
burst of files, against baselines measured in the same run (the settle delay itself; queueing
the same images straight through the queue, without the watcher).

    .venv/bin/python -m bench.inbox_bench [--quick]
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.table import Row, compare, main_for, percentile
from service.config import Settings
from service.inbox.watcher import InboxWatcher
from service.intake import inspect_image, store_image
from service.store.ledger import Ledger
from service.store.migrate import migrate
from service.store.queue import Queue


def image_bytes(i: int, size: int = 1280) -> bytes:
    """A distinct 1280x960 JPEG per `i`, textured like a photo (a few hundred KiB)."""
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 64, (size * 3 // 4, size, 3), dtype=np.uint8)
    pixels += np.linspace(0, 160, size, dtype=np.uint8)[None, :, None]
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def queued_count(queue: Queue) -> int:
    return (await queue.counts())["queued"]


async def wait_for(queue: Queue, n: int, timeout: float = 600) -> float:
    start = time.perf_counter()
    while await queued_count(queue) < n:
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{n} jobs not queued after {timeout} s")
        await asyncio.sleep(0.005)
    return time.perf_counter()


async def measure(files: int, settle: float, samples: int) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="aip-bench-"))
    settings = Settings(
        data_dir=work / "data",
        inbox=work / "inbox",
        inbox_settle_seconds=settle,
        inbox_rescan_seconds=3600,
    )
    migrate(settings.database)
    queue = await Queue.open(settings.database)
    watcher = InboxWatcher(settings, Ledger(queue), lambda: None)
    watcher.start()
    await asyncio.sleep(0.5)
    inbox = settings.inbox_dir

    rows = []
    for label, atomic in (("written in place", False), ("renamed into place", True)):
        latencies = []
        for i in range(samples):
            data = image_bytes(100_000 + i + (samples if atomic else 0))
            target = inbox / f"lat-{label[0]}-{i}.jpg"
            before = await queued_count(queue)
            if atomic:
                tmp = inbox / f".lat-{i}.part"
                tmp.write_bytes(data)
                os.replace(tmp, target)
            else:
                target.write_bytes(data)
            finished = time.perf_counter()
            latencies.append(await wait_for(queue, before + 1) - finished)
        rows.append((label, latencies))

    burst = [image_bytes(i) for i in range(files)]
    staging = work / "staging"
    staging.mkdir()
    for i, data in enumerate(burst):
        (staging / f"IMG_{i:05d}.jpg").write_bytes(data)
    # Counted in memory, not by asking the queue: a poll every 5 ms goes through the one
    # database writer the watcher is writing through, and slowed it (0.74 -> 0.53 measured).
    before = watcher.counts.ingested
    start = time.perf_counter()
    os.replace(staging, inbox / "card")  # the whole card lands at once
    first = None
    while watcher.counts.ingested < before + files:
        if first is None and watcher.counts.ingested > before:
            first = time.perf_counter()
        if time.perf_counter() - start > 600:
            raise TimeoutError(f"{files} files not queued after 600 s")
        await asyncio.sleep(0.005)
    done = time.perf_counter()
    assert await queued_count(queue) >= files  # the jobs are in the queue, not only counted
    inbox_rate = files / (done - start)
    after_settle = (files - 1) / (done - (first or start))
    first_after = (first or done) - start
    await watcher.stop()
    await queue.close()

    # Baseline: the same images validated, stored and queued directly, no watcher.
    base = Settings(data_dir=work / "base")
    migrate(base.database)
    direct = await Queue.open(base.database)
    start = time.perf_counter()
    for i, data in enumerate(burst):
        record = await asyncio.to_thread(inspect_image, data, max_pixels=base.max_pixels)
        await asyncio.to_thread(store_image, data, record, base.data_dir)
        await direct.enqueue(record, {"queries": ["x"], "prompt": "p"}, input_name=f"{i}.jpg")
    direct_rate = files / (time.perf_counter() - start)
    await direct.close()

    out = []
    for label, values in rows:
        out.append(
            compare(f"file finished -> queued, {label}, p50", statistics.median(values), settle,
                    unit="s", at_most=1.5,
                    note=f"baseline: the settle delay itself; {samples} files; target "
                    "proposed here (the issue sets none)")
        )  # fmt: skip
        out.append(
            compare(f"file finished -> queued, {label}, p99", percentile(values, 99), settle,
                    unit="s", at_most=2.0, note="baseline: the settle delay; target proposed here")
        )  # fmt: skip
    out.append(
        compare(f"{files}-file burst, watcher end to end", inbox_rate, direct_rate,
                unit="files/s", at_least=0.8,
                note=f"{len(burst[0]) // 1024} KiB JPEGs; baseline: validating, storing and "
                "enqueueing the same images directly; target proposed here. "
                + BURST.format(first=first_after, settle=settle,
                               rate=after_settle, ratio=after_settle / direct_rate))
    )  # fmt: skip
    return out


# Where a burst's time goes (profiled: each stage timed across a burst, on 2 shared cores).
BURST = (
    "The first job is queued {first:.2f} s after the drop: the {settle:g} s settle delay every "
    "file waits by design (unchanged that long = finished); after it the watcher queues "
    "{rate:.1f} files/s, {ratio:.2f}x the direct loop. Was 0.74 (0.53 with this benchmark's "
    "own queue polls every 5 ms, which went through the one writer the watcher writes "
    "through: now counted in memory): the settle was dead time, then each file was read, "
    "decoded and hashed (~22 ms, as in the baseline), stored (~5 ms), recorded (known, accept, "
    "filed: ~7 ms) and filed (~1 ms), 2 at a time. Now an image still at one look is read, "
    "decoded and hashed while it settles (up to 64 MiB ahead; used only if its size and mtime "
    "still match once settled), so the wait overlaps the work. What is left: the ledger and "
    "filing per file, which the direct loop does not do"
)


def run(quick: bool) -> list[Row]:
    files, samples = (100, 4) if quick else (1000, 10)
    return asyncio.run(measure(files, 1.0, samples))


if __name__ == "__main__":
    main_for("inbox", run, __doc__)
