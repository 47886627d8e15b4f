"""Private by default on disk: what the service writes is readable by its own user only (umask
0o077 while it runs), and an older install's data directory, database, images and logs are
tightened at start. Knows where the service keeps files, never what is in them."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from pathlib import Path

from service.config import Settings, default_log_dir

log = logging.getLogger("aip")

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
# SQLite gives its WAL, shared-memory and journal files the database file's own mode.
DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")
LOG_PREFIX = "aip.log"

_lock = threading.Lock()
_holders = 0
_previous: int | None = None


def enter_private_umask() -> None:
    """Set the process umask to 0o077 until the last holder leaves (several services can run in
    one process, as in tests: the umask is the process's, so it is counted, not nested)."""
    global _holders, _previous
    with _lock:
        if _holders == 0:
            _previous = os.umask(PRIVATE_UMASK)
        _holders += 1


def leave_private_umask() -> None:
    global _holders, _previous
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0 and _previous is not None:
            os.umask(_previous)
            _previous = None


def _chmod(path: Path, mode: int) -> bool:
    """Set `mode` on `path` (never through a symlink); True when it changed anything."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode) or stat.S_IMODE(info.st_mode) == mode:
        return False
    path.chmod(mode)
    return True


def _tighten_tree(top: Path) -> int:
    """Folders 0700 and files 0600 under `top` (symlinks are left alone); returns the count."""
    changed = 0
    for folder, dirs, files in os.walk(top):
        here = Path(folder)
        changed += sum(_chmod(here / d, DIR_MODE) for d in dirs)
        changed += sum(_chmod(here / f, FILE_MODE) for f in files)
    return changed


def tighten(settings: Settings) -> int:
    """Make an install private: the data directory 0700; the database (and its WAL and SHM),
    stored images and log files 0600. Returns how many modes it changed (0 on a private one)."""
    data_dir = settings.data_dir
    data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    changed = 0
    # The images tree is walked only while the data directory is still open to others: once
    # it is 0700, nothing below it can be read by another user whatever its own mode.
    if stat.S_IMODE(data_dir.stat().st_mode) != DIR_MODE:
        changed += _chmod(settings.images_dir, DIR_MODE)
        if settings.images_dir.is_dir():
            changed += _tighten_tree(settings.images_dir)
        changed += _chmod(data_dir / "aip.lock", FILE_MODE)
    for suffix in DATABASE_SUFFIXES:
        changed += _chmod(Path(f"{settings.database}{suffix}"), FILE_MODE)
    logs = settings.logs_dir
    if logs == default_log_dir(data_dir) or logs.is_relative_to(data_dir):
        changed += _chmod(logs, DIR_MODE)  # a folder the user chose is theirs to set
    with contextlib.suppress(OSError):
        for entry in logs.iterdir():
            if entry.name.startswith(LOG_PREFIX) and entry.is_file():
                changed += _chmod(entry, FILE_MODE)
    changed += _chmod(data_dir, DIR_MODE)  # last: a crash above leaves the walk to redo
    if changed:
        log.info("made %d files and folders private to this user in %s", changed, data_dir)
    return changed
