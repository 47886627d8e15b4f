"""Whether the disk under a folder is full: which errors mean it, how many bytes are free, and
one shared state per folder that the API, worker, inbox and health read; it runs nothing."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import DiskFull

log = logging.getLogger("aip.disk")

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13
# Space counts as back once this much more is free than when a write last failed: a few bytes
# freed by chance would only let the next write fail the same way.
RESUME_MARGIN = 1024 * 1024
LOG_EVERY_SECONDS = 60.0


def is_disk_full(exc: BaseException) -> bool:
    """A write refused for want of space or quota, from the OS or from SQLite."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == _SQLITE_FULL) or (
            "database or disk is full" in str(exc)
        )
    return False


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    for candidate in (path, *path.parents):
        try:
            stat = os.statvfs(candidate)
        except OSError:
            continue
        return int(stat.f_bavail * stat.f_frsize)
    return 0


@dataclass
class DiskState:
    """The last verdict on one folder's disk: full from a failed write until space is back."""

    path: Path
    full: bool = False
    since: float | None = None
    what: str = ""  # what could not be written
    free_at_failure: int = 0
    _last_log: float = field(default=float("-inf"), repr=False)
    _suppressed: int = field(default=0, repr=False)

    def note_full(self, what: str) -> DiskFull:
        """Record a failed write; log it (at most once a minute); the error for the caller."""
        free = free_bytes(self.path)
        if not self.full:
            self.since = time.time()
        self.full, self.what, self.free_at_failure = True, what, free
        message = self.message()
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_SECONDS:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning("%s%s", message, more)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1
            log.debug("%s", message)
        return DiskFull(message)

    def message(self) -> str:
        return (
            f"the disk holding {self.path} is full ({self.free_at_failure:,} bytes free): "
            f"{self.what} failed. New jobs are refused and the worker waits; free some space "
            "(or prune old jobs with AIP_RETENTION, or move AIP_DATA_DIR) and it resumes by itself"
        )

    def space_back(self) -> bool:
        """Whether enough space was freed since the last failure; clears the state if so."""
        if not self.full:
            return True
        free = free_bytes(self.path)
        if free < self.free_at_failure + RESUME_MARGIN:
            return False
        self.full, self.since = False, None
        self._last_log, self._suppressed = float("-inf"), 0
        log.info("disk space is back on %s (%s bytes free): resuming", self.path, f"{free:,}")
        return True

    def problem(self) -> dict[str, Any] | None:
        """For health: None while writes work, else why not."""
        if self.space_back():
            return None
        return {
            "reason": self.message(),
            "path": str(self.path),
            "free_bytes": free_bytes(self.path),
            "since": self.since,
        }


_STATES: dict[str, DiskState] = {}


def watch(path: Path) -> DiskState:
    """The one state of `path` shared by everything in this process that writes there."""
    key = os.path.abspath(path)
    state = _STATES.get(key)
    if state is None:
        state = _STATES[key] = DiskState(Path(key))
    return state


def problem(*paths: Path) -> dict[str, Any] | None:
    """The first of `paths` whose disk is full, described; None when none is."""
    for path in dict.fromkeys(os.path.abspath(p) for p in paths):
        found = watch(Path(path)).problem()
        if found is not None:
            return found
    return None
