"""Inbox benchmark: latency from "file finished" to "job queued", and the ingest rate of a
burst of files, against baselines measured in the same run (the settle delay itself; queueing
the same images straight through the queue, without the watcher).

    .venv/bin/python bench/inbox_bench.py [--files 1000] [--settle 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

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


async def run(files: int, settle: float, samples: int) -> None:
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
        rows.append((f"latency, {label}", latencies))

    burst = [image_bytes(i) for i in range(files)]
    staging = work / "staging"
    staging.mkdir()
    for i, data in enumerate(burst):
        (staging / f"IMG_{i:05d}.jpg").write_bytes(data)
    before = await queued_count(queue)
    start = time.perf_counter()
    os.replace(staging, inbox / "card")  # the whole card lands at once
    done = await wait_for(queue, before + files)
    inbox_rate = files / (done - start)
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

    print(
        f"\ninbox benchmark: {files} files of {len(burst[0]) // 1024} KiB JPEG, "
        f"settle {settle:g} s, {os.cpu_count()} cores\n"
    )
    print(f"{'measure':<34}{'median':>10}{'p95':>10}{'max':>10}")
    for label, values in rows:
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        print(
            f"{label + ' (s)':<34}{statistics.median(values):>10.3f}{p95:>10.3f}"
            f"{max(values):>10.3f}"
        )
    print(f"{'baseline: settle delay (s)':<34}{settle:>10.3f}")
    print(f"\n{'ingest rate':<34}{'files/s':>10}")
    print(f"{'inbox burst (watcher, end to end)':<34}{inbox_rate:>10.1f}")
    print(f"{'baseline: direct enqueue':<34}{direct_rate:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(run(args.files, args.settle, args.samples))


if __name__ == "__main__":
    main()
