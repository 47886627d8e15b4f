"""Retention: removes finished jobs older than a cutoff (rows, stored images and redacted
copies, or both), and originals a redacting job no longer needs; never touches queued or running
work. Deletes run as one transaction on the queue's writer thread."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from service.store.db import Db
from service.store.dialect import is_false_sql
from service.store.files import StoredFiles
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
    files: StoredFiles | None = None,
) -> Pruned:
    """Finished jobs whose finish is older than the cutoff lose their stored image; without
    `keep_results` their rows go too. An image still used by any other job is kept. With
    `dry_run` it only reports what it would remove. `files`: where they are stored (default:
    files under `data_dir`)."""
    files = files or StoredFiles(data_dir)
    terminal = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
    old = f"SELECT id FROM jobs WHERE status IN ({terminal}) AND finished_at < :cutoff"
    began = time.time()
    args = {"cutoff": began - older_than_seconds, "now": began}
    report = Pruned()

    def prune_rows(db: Db) -> list[tuple[str, str, int]]:
        count = db.execute(f"SELECT count(*) FROM ({old}) AS old", args).fetchone()
        if not count or not count[0]:
            return []
        # Redacted copies go with their jobs' images, and are counted in the bytes freed.
        copies = [
            (str(row[0]), _bytes_of(files.path(str(row[0]))))
            for row in db.execute(
                "SELECT redacted_path FROM results WHERE redacted_path IS NOT NULL"
                f" AND job_id IN ({old})",
                args,
            )
        ]
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
        report.bytes_freed = sum(size for _sha, _path, size in images) + sum(
            size for _path, size in copies
        )
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
        return [*images, *(("", path, size) for path, size in copies)]

    images = await queue.write(prune_rows)
    # Files go after the rows are committed: a crash in between leaves a stray file, never a
    # row pointing at a missing one.
    for _sha, path, _size in images:
        # A submission of the same bytes since the prune began touched the file: keep it.
        await files.delete(path, unless_touched_since=began)
    if not dry_run:
        # The jobs just removed may have been all that kept a redacting job's original.
        for job_id in await queue.write(partial(_waiting_to_drop, dialect=queue.dialect)):
            if await drop_original(queue, data_dir, job_id, files=files):
                report.images_removed += 1
    return report


def _waiting_to_drop(db: Db, dialect: str) -> list[int]:
    """Redacting jobs, not keeping their original, whose original is still stored."""
    return [
        int(row[0])
        for row in db.execute(
            "SELECT jobs.id FROM jobs JOIN images ON images.sha256 = jobs.image_sha256"
            " JOIN results ON results.job_id = jobs.id"
            " WHERE images.pruned_at IS NULL AND results.redacted_path IS NOT NULL"
            f" AND {is_false_sql(dialect, 'jobs.params', 'keep_original')}"
        )
    ]


def _bytes_of(file: Path) -> int:
    try:
        return file.stat().st_size
    except FileNotFoundError:
        return 0


def _needs_original(status: str, params: dict[str, Any]) -> bool:
    """Whether a job still needs its image's original: it is yet to run (or running), hands
    the original out (redacts nothing), or was asked to keep it."""
    return (
        status in ("queued", "running")
        or not params.get("redact")
        or bool(params.get("keep_original", True))
    )


async def drop_original(
    queue: Queue, data_dir: Path, job_id: int, *, files: StoredFiles | None = None
) -> bool:
    """Once job `job_id` (redacting, not keeping its original) has its redacted copy, delete
    the stored original unless another job with the same image still needs it (see
    `_needs_original`), and mark the image pruned. True when the file was removed; calling it
    for any other job does nothing."""
    began = time.time()
    files = files or StoredFiles(data_dir)

    def mark(db: Db) -> str | None:
        row = db.execute(
            "SELECT jobs.image_sha256, jobs.params, results.redacted_path, images.path"
            " FROM jobs JOIN images ON images.sha256 = jobs.image_sha256"
            " LEFT JOIN results ON results.job_id = jobs.id"
            " WHERE jobs.id = ? AND images.pruned_at IS NULL",
            (job_id,),
        ).fetchone()
        if row is None or row[2] is None or not files.path(str(row[2])).is_file():
            return None
        sha, own = str(row[0]), json.loads(row[1])
        if not own.get("redact") or own.get("keep_original", True):
            return None
        others = db.execute(
            "SELECT status, params FROM jobs WHERE image_sha256 = ? AND id != ?", (sha, job_id)
        )
        if any(_needs_original(str(status), json.loads(params)) for status, params in others):
            return None
        db.execute("UPDATE images SET pruned_at = ? WHERE sha256 = ?", (began, sha))
        return str(row[3])

    path = await queue.write(mark)
    if path is None:
        return False
    # A submission of the same bytes since this began touched the file: keep it.
    return await files.delete(path, unless_touched_since=began)
