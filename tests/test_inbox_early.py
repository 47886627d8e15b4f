"""Inbox images read while they settle: used only for the very bytes that settled, and then the
same record the usual read gives."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from service.inbox.early import EarlyReads
from service.intake import inspect_image
from tests.conftest import make_image

MAX_PIXELS = 100_000_000


def stat_of(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def test_an_unchanged_file_read_early_gives_what_the_usual_read_gives(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(make_image(64, 48, color=(10, 200, 30)))

    async def main() -> object:
        early = EarlyReads(MAX_PIXELS)
        early.start("a.jpg", path, *stat_of(path))
        return await early.take("a.jpg", *stat_of(path))

    taken = asyncio.run(main())
    data = path.read_bytes()
    assert taken == (data, inspect_image(data, max_pixels=MAX_PIXELS))


def test_a_file_written_after_its_early_read_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "b.jpg"
    first, second = make_image(64, 48, color=(1, 2, 3)), make_image(64, 48, color=(200, 2, 3))
    path.write_bytes(first)
    before = stat_of(path)

    async def main() -> tuple[object, object]:
        early = EarlyReads(MAX_PIXELS)
        early.start("b.jpg", path, *before)
        await asyncio.sleep(0.05)
        path.write_bytes(second)  # rewritten in place: a new mtime
        os.utime(path, ns=(before[1] + 10**9, before[1] + 10**9))
        changed = await early.take("b.jpg", *stat_of(path))
        early.start("b.jpg", path, *before)  # the stat is already stale when the read starts
        stale = await early.take("b.jpg", *before)
        return changed, stale

    changed, stale = asyncio.run(main())
    assert changed is None and stale is None


def test_early_reads_stay_within_their_bytes_and_are_dropped_with_their_files(
    tmp_path: Path,
) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(make_image(64, 48, color=(i, 0, 0)))
    size = max(p.stat().st_size for p in paths)

    async def main() -> list[object]:
        early = EarlyReads(MAX_PIXELS, max_bytes=2 * size)
        for p in paths:
            early.start(p.name, p, *stat_of(p))
        early.keep_only({"1.jpg", "2.jpg"})  # 0.jpg left the queue of waiting files
        taken = [await early.take(p.name, *stat_of(p)) for p in paths]
        await early.close()
        return taken

    taken = asyncio.run(main())
    assert taken[0] is None and taken[1] is not None  # dropped; read early
    assert taken[2] is None  # no room left when it was offered: read the usual way


def test_a_file_replaced_by_one_with_its_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    path, other = tmp_path / "c.jpg", tmp_path / ".c.jpg.part"
    first = make_image(64, 48, color=(1, 2, 3))
    second = first[:-64] + bytes(64)  # other bytes, the same size
    path.write_bytes(first)
    before = stat_of(path)

    async def main() -> object:
        early = EarlyReads(MAX_PIXELS)
        early.start("c.jpg", path, *before)
        await asyncio.sleep(0.05)
        # `cp -p` / `rsync -t` then a rename: new bytes, same size and mtime, another inode
        other.write_bytes(second)
        os.utime(other, ns=(before[1], before[1]))
        os.replace(other, path)
        assert stat_of(path) == before
        return await early.take("c.jpg", *before)

    assert asyncio.run(main()) is None
