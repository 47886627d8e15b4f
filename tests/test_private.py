"""Private by default on disk: a real service's data directory, database (with its WAL and
SHM), stored images and logs are its user's only, an older install is tightened at start, and
the user's own inbox keeps the permissions the user gave it."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from service.config import Settings
from service.logs import PrivateRotatingFileHandler
from tests.conftest import RunningService, make_image, make_settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def current_umask() -> int:
    previous = os.umask(0o022)
    os.umask(previous)
    return previous


def stored_images(settings: Settings) -> list[Path]:
    return [p for p in settings.images_dir.rglob("*") if p.is_file()]


def test_a_fresh_install_is_private(
    settings: Settings, serve: Callable[..., RunningService]
) -> None:
    umask_before = current_umask()
    service = serve(settings)
    job = service.wait(service.submit(make_image(60, 40)).json()["id"])
    assert job["status"] == "succeeded"
    data = settings.data_dir
    assert mode(data) == 0o700
    for name in ("aip.db", "aip.db-wal", "aip.db-shm"):
        assert mode(data / name) == 0o600, name  # the WAL and SHM exist while it runs
    images = stored_images(settings)
    assert len(images) == 1 and mode(images[0]) == 0o600
    assert mode(images[0].parent) == 0o700 and mode(settings.images_dir) == 0o700
    service.stop()
    assert current_umask() == umask_before  # the process's umask is given back


def test_an_older_install_is_tightened_at_start(
    tmp_path: Path, serve: Callable[..., RunningService]
) -> None:
    settings = make_settings(tmp_path, log_dir=tmp_path / "data" / "logs")
    first = serve(settings)
    first.wait(first.submit(make_image(61, 40)).json()["id"])
    first.stop()
    # What an older version left: everything readable by every user of the machine.
    data = settings.data_dir
    settings.logs_dir.mkdir()
    (settings.logs_dir / "aip.log").write_text("x\n")
    (settings.logs_dir / "aip.log.1").write_text("x\n")
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    serve(settings)
    assert mode(data) == 0o700 and mode(data / "aip.db") == 0o600
    assert mode(settings.images_dir) == 0o700
    assert {mode(p) for p in stored_images(settings)} == {0o600}
    assert mode(settings.logs_dir) == 0o700
    assert mode(settings.logs_dir / "aip.log") == mode(settings.logs_dir / "aip.log.1") == 0o600


def test_log_files_are_private_from_the_first_line_and_after_rotation(tmp_path: Path) -> None:
    (tmp_path / "aip.log").write_text("an older, world-readable log\n")
    (tmp_path / "aip.log").chmod(0o644)
    handler = PrivateRotatingFileHandler(tmp_path / "aip.log", maxBytes=200, backupCount=2)
    try:
        for i in range(20):
            handler.emit(logging.makeLogRecord({"msg": f"line {i} of a job's results"}))
    finally:
        handler.close()
    logs = sorted(tmp_path.glob("aip.log*"))
    assert [p.name for p in logs] == ["aip.log", "aip.log.1", "aip.log.2"]
    assert {mode(p) for p in logs} == {0o600}


def test_the_users_inbox_keeps_its_own_permissions(
    tmp_path: Path, serve: Callable[..., RunningService]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    inbox.chmod(0o755)
    settings = make_settings(tmp_path, inbox=inbox, inbox_settle_seconds=0.2)
    service = serve(settings)
    note = inbox / "notes.txt"
    note.write_text("not a picture")
    note.chmod(0o644)
    error = inbox / "failed" / "notes.txt.error.json"
    deadline = time.monotonic() + 30
    while not error.exists():
        assert time.monotonic() < deadline, "the file was not filed"
        time.sleep(0.05)
    assert service.client.get("/v1/inbox").json()["since_start"]["rejected"] == 1
    assert json.loads(error.read_text())["code"] == "unsupported_type"
    assert mode(inbox) == 0o755 and mode(inbox / "failed") == 0o755
    assert mode(inbox / "failed" / "notes.txt") == 0o644 and mode(error) == 0o644
