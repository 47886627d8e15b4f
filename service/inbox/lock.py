"""One inbox, one service: an exclusive lock on a hidden file inside the inbox, held while the
service runs (the watcher ignores hidden files, so the lock never becomes a job); among nodes
sharing a PostgreSQL database, an advisory lock keyed by the folder's path as well."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import StartupRefused

if TYPE_CHECKING:
    from service.store.postgres.advisory import AdvisoryLock

log = logging.getLogger("aip.inbox")

LOCK_NAME = ".aip.lock"
_FIX = (
    "give this service its own inbox with --inbox or AIP_INBOX, or turn its inbox off with "
    "AIP_INBOX_ENABLED=0"
)


class InboxLock:
    def __init__(self, inbox: Path, data_dir: Path) -> None:
        self.inbox = inbox
        self.path = inbox / LOCK_NAME
        self.data_dir = data_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the inbox, or raise StartupRefused naming the service that holds it."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupRefused(
                f"cannot open the inbox lock {self.path} ({exc.strerror}), so another user's "
                f"service may be watching {self.inbox}; {_FIX}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise StartupRefused(
                f"the inbox {self.inbox} is already watched by another aip service ({holder}); "
                f"{_FIX}"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                os.close(fd)
                raise
            # Some network shares have no file locks: watch anyway, and say what is at stake.
            log.warning(
                "inbox %s cannot be locked on this file system; make sure no other aip service "
                "watches it, or files may become a job in each",
                self.inbox,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "data_dir": str(self.data_dir)}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def _describe(fd: int) -> str:
    """`pid 123, data directory /x` from what the holder wrote, or a plain phrase."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(holder['pid'])}, data directory {holder['data_dir']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is unknown"


def advisory_key(inbox: Path) -> int:
    """The PostgreSQL advisory lock key of an inbox folder: a hash of its resolved path, the
    same on every node that mounts it at that path."""
    from service.store.postgres.advisory import lock_key

    return lock_key(f"aip inbox {inbox.resolve()}")


def shared_inbox_lock(url: str, inbox: Path) -> AdvisoryLock:
    """One inbox among nodes sharing a PostgreSQL database: held while this node watches."""
    from service.store.postgres.advisory import AdvisoryLock

    return AdvisoryLock(url, advisory_key(inbox))
