"""Retention: removes finished jobs older than a cutoff (rows, stored images, or both); never
touches queued or running work. Deletes run as one transaction on the queue's writer thread."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.store.queue import TERMINAL, Queue


@dataclass
class Pruned:
    jobs_removed: int = 0
    images_removed: int = 0
    bytes_freed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def prune(
    queue: Queue,
    data_dir: Path,
    *,
    older_than_seconds: float,
    keep_results: bool,
    dry_run: bool = False,
) -> Pruned:
    """Finished jobs whose finish is older than the cutoff lose their stored image; without
    `keep_results` their rows go too. An image still used by any other job is kept. With
    `dry_run` it only reports what it would remove."""
    terminal = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
    old = f"SELECT id FROM jobs WHERE status IN ({terminal}) AND finished_at < :cutoff"
    began = time.time()
    args = {"cutoff": began - older_than_seconds, "now": began}
    report = Pruned()

    def prune_rows(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
        count = db.execute(f"SELECT count(*) FROM ({old})", args).fetchone()
        if not count or not count[0]:
            return []
        # Images used only by old jobs (a newer or unfinished job keeps its image).
        images = [
            (str(row[0]), str(row[1]), int(row[2]))
            for row in db.execute(
                "SELECT sha256, path, bytes FROM images WHERE pruned_at IS NULL"
                f" AND sha256 IN (SELECT image_sha256 FROM jobs WHERE id IN ({old}))"
                f" AND sha256 NOT IN (SELECT image_sha256 FROM jobs WHERE id NOT IN ({old}))",
                args,
            )
        ]
        report.images_removed = len(images)
        report.bytes_freed = sum(size for _sha, _path, size in images)
        report.jobs_removed = 0 if keep_results else int(count[0])
        if dry_run:
            return []  # nothing written: the transaction ends empty, no file is touched
        db.executemany(
            "UPDATE images SET pruned_at = ? WHERE sha256 = ?",
            [(args["now"], sha) for sha, _path, _size in images],
        )
        if not keep_results:
            # The ledger keeps knowing the file (a file left in the inbox must not become a
            # new job); only the content's claim to a job is released.
            db.execute(
                f"UPDATE inbox_files SET outcome = 'pruned', job_id = NULL WHERE job_id IN ({old})",
                args,
            )
            db.execute(f"DELETE FROM jobs WHERE id IN ({old})", args)
            db.execute(
                "DELETE FROM images WHERE pruned_at IS NOT NULL AND sha256 NOT IN"
                " (SELECT image_sha256 FROM jobs)"
            )
        return images

    images = await queue.write(prune_rows)
    # Files go after the rows are committed: a crash in between leaves a stray file, never a
    # row pointing at a missing one.
    for _sha, path, _size in images:
        file = data_dir / path
        with contextlib.suppress(FileNotFoundError):
            # A submission of the same bytes since the prune began touched the file: keep it.
            if file.stat().st_mtime < began:
                file.unlink()
    return report
