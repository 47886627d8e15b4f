"""A full disk under the data directory: 507 with the free bytes and nothing half-queued,
health degraded, a quiet worker that hands its job back uncounted, and a service that resumes
by itself once space is freed. Runs on a real, small tmpfs, so it needs root (CI is root)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.diskspace import is_disk_full
from service.errors import DiskFull, JobFailure
from service.logs import PrivateRotatingFileHandler
from service.store.migrate import migrate
from service.store.queue import ImageRecord, Outcome, Queue
from tests.conftest import RunningService, gate_detector, make_image, make_settings

Serve = Callable[..., RunningService]


class SmallDisk:
    """A 12 MB tmpfs that can be filled to the last byte and emptied again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        with self.filler.open("ab", buffering=0) as out:
            for chunk in (b"\0" * 65536, b"\0" * 4096):
                try:
                    while True:
                        out.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs: run as root, as CI does")
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"needs root to mount a tmpfs: run as root, as CI does ({mounted.stderr})")
    try:
        yield SmallDisk(where)
    finally:
        # Lazy, so a file a failed test left open cannot keep the mount alive.
        subprocess.run(["umount", "-l", str(where)], check=False)


IMAGE = ImageRecord(sha256="ef" * 32, bytes=10, width=8, height=8, format="PNG", path="x.png")


def test_sqlite_full_is_disk_full_and_the_queue_recovers_when_space_returns(
    small_disk: SmallDisk,
) -> None:
    async def scenario() -> list[str]:
        db = small_disk.path / "aip.db"
        migrate(db)
        queue = await Queue.open(db)
        try:
            first, _ = await queue.enqueue(IMAGE, {}, input_name="a.png")
            claim = await queue.claim("worker", 30)
            assert claim is not None
            second, _ = await queue.enqueue(IMAGE, {}, input_name="b.png")
            small_disk.fill()
            # A small transaction fails at COMMIT (where WAL frames are written), a large one
            # at its statements: both are DiskFull, and the writer is left usable.
            for attempt in (
                queue.enqueue(IMAGE, {"prompt": "x" * 2_000_000}, input_name="big.png"),
                queue.enqueue(IMAGE, {}, input_name="c.png"),
                queue.heartbeat(claim, 30),
                queue.complete(claim, Outcome([], "a result")),
                queue.release(claim, JobFailure("disk_full", "handed back", transient=True)),
                queue.claim("worker", 30),
                queue.recover(expired_only=False),
            ):
                with pytest.raises(DiskFull, match="bytes free"):
                    await attempt
                assert not queue.writer.in_transaction
            assert await queue.counts() == {**(await queue.counts()), "queued": 1, "running": 1}
            small_disk.free()
            again = await queue.claim("worker", 30)  # writes the held-up hand-back first
            assert again is not None and again.job_id == first and again.attempt == 2
            assert await queue.complete(again, Outcome([], "saved"))
            rest = await queue.claim("worker", 30)
            assert rest is not None and rest.job_id == second
            rows = await queue.read(
                lambda conn: conn.execute(
                    "SELECT outcome, coalesce(error_code, '') FROM job_attempts"
                    " WHERE job_id = ? ORDER BY id",
                    (first,),
                ).fetchall()
            )
            return [f"{outcome}:{code}" for outcome, code in rows]
        finally:
            await queue.close()

    assert asyncio.run(scenario()) == ["released:disk_full", "succeeded:"]


def test_with_a_wal_past_its_checkpoint_size_every_write_succeeds_or_is_disk_full(
    small_disk: SmallDisk,
) -> None:
    """With a large WAL, SQLite reuses it and retries its checkpoint (into a database file
    that cannot grow) at each commit: small writes may still succeed, large ones fail."""

    async def scenario() -> tuple[int, int, int]:
        db = small_disk.path / "aip.db"
        migrate(db)
        queue = await Queue.open(db)
        try:
            for n in range(400):  # over 1000 pages of WAL: the auto-checkpoint threshold
                await queue.enqueue(IMAGE, {"prompt": "p" * 200}, input_name=f"{n}.png")
            assert (db.parent / "aip.db-wal").stat().st_size > 1000 * 4096
            small_disk.fill()
            saved = refused = 0
            for size in (10, 1000, 100_000, 3_000_000) * 3:
                try:
                    await queue.enqueue(IMAGE, {"prompt": "q" * size}, input_name="late.png")
                    saved += 1
                except DiskFull:
                    refused += 1
                assert not queue.writer.in_transaction
            small_disk.free()
            await queue.enqueue(IMAGE, {}, input_name="after.png")
            return saved, refused, (await queue.counts())["queued"]
        finally:
            await queue.close()

    saved, refused, queued = asyncio.run(scenario())
    assert refused > 0  # the 3 MB ones at least
    assert queued == 400 + saved + 1  # every write either landed whole or not at all


def test_disk_full_is_recognised_from_the_os_and_from_sqlite() -> None:
    import sqlite3

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_full_disk_refuses_with_507_degrades_health_and_resumes_by_itself(
    tmp_path: Path,
    small_disk: SmallDisk,
    serve: Serve,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    photos, inbox = tmp_path / "photos", tmp_path / "inbox"
    photos.mkdir()
    (photos / "p.jpg").write_bytes(make_image(50, 40))
    settings = make_settings(
        tmp_path,
        data_dir=small_disk.path / "data",
        inbox=inbox,
        allowed_dirs=(photos,),
        inbox_settle_seconds=0.1,
        inbox_rescan_seconds=0.3,
    )
    service = serve(settings)
    worker = service.services.worker
    gate = gate_detector(service, monkeypatch)
    running = service.submit(make_image(64, 48), queries="car").json()["id"]
    assert gate.inside.wait(timeout=60)
    queued = service.submit(make_image(72, 48)).json()["id"]

    small_disk.fill()
    caplog.set_level(logging.INFO)
    caplog.clear()
    refused = service.submit(make_image(80, 48))
    assert refused.status_code == 507, refused.text
    assert refused.json()["code"] == "disk_full"
    assert "bytes free" in refused.json()["message"]
    by_path = service.client.post("/v1/jobs", json={"path": str(photos / "p.jpg")})
    assert by_path.status_code == 507 and by_path.json()["code"] == "disk_full"
    inbox.mkdir(exist_ok=True)
    (inbox / "drop.jpg").write_bytes(make_image(90, 48))
    health = service.client.get("/v1/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert "is full" in health.json()["reasons"][0]

    gate.release.set()  # the running job finishes its inference; its result cannot be saved
    _wait_for(lambda: worker._disk_strikes >= 3, "the worker to retry a few times")
    assert [job["id"] for job in service.client.get("/v1/jobs").json()["jobs"]] == [
        queued,
        running,
    ]  # the refused submissions left nothing behind
    assert (inbox / "drop.jpg").exists() and not (inbox / "failed").exists()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) <= 2, [r.getMessage() for r in noisy]
    assert not [r for r in caplog.records if r.exc_info], "no traceback on a full disk"

    small_disk.free()
    done = service.wait(running)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    outcomes = [a["outcome"] for a in done["attempt_history"]]
    assert outcomes == ["released", "succeeded"]  # handed back, never lost
    assert done["max_attempts"] == settings.max_attempts + 1  # and the attempt not spent
    assert service.wait(queued)["status"] == "succeeded"
    fresh = service.submit(make_image(96, 48))
    assert fresh.status_code == 202
    assert service.wait(fresh.json()["id"])["status"] == "succeeded"
    _wait_for(lambda: not (inbox / "drop.jpg").exists(), "the dropped file to be taken in")
    assert not (inbox / "failed").exists()
    assert service.client.get("/v1/health").json()["status"] == "ok"


def test_the_log_file_drops_records_quietly_while_the_disk_is_full(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk must not turn every log record into a traceback on stderr; any other write
    error still reports itself."""
    handler = PrivateRotatingFileHandler(tmp_path / "aip.log", maxBytes=1 << 20, backupCount=1)
    record = logging.LogRecord("aip", logging.INFO, __file__, 1, "a line", None, None)
    handler.stream.close()
    handler.stream = open("/dev/full", "w")  # noqa: SIM115 - every write fails with ENOSPC
    for _ in range(5):
        handler.emit(record)
    assert "Logging error" not in capsys.readouterr().err
    with contextlib.suppress(OSError):  # the unwritten buffer fails once more on close
        handler.stream.close()
    handler.stream = open(tmp_path / "aip.log")  # noqa: SIM115 - read-only: EBADF on write
    handler.emit(record)
    assert "Logging error" in capsys.readouterr().err
    handler.stream.close()
    handler.stream = None  # type: ignore[assignment]
