"""The service's own log: a size-capped rotating file in the log directory, plus stderr; it
knows where and how much to write, never what the service does."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

LOG_FILE = "aip.log"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5  # at most (BACKUPS + 1) * MAX_BYTES on disk, however long the service runs
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's loggers keep their own handlers unless told otherwise; emptied, they propagate to
# the root logger and so reach the same file (uvicorn.run must get log_config=None).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
# Logs name the files and show the results of other people's images: this user's only.
LOG_DIR_MODE = 0o700
LOG_FILE_MODE = 0o600


def _private_opener(path: str, flags: int) -> int:
    fd = os.open(path, flags, LOG_FILE_MODE)
    os.fchmod(fd, LOG_FILE_MODE)  # a file an older version left readable by others
    return fd


class PrivateRotatingFileHandler(RotatingFileHandler):
    """A rotating log whose every file (the current one and each rotation) is 0600, and which
    drops records quietly while the disk is full instead of printing a traceback for each."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return  # the disk-full state is reported by health and one line a minute
        super().handleError(record)

    def _open(self) -> io.TextIOWrapper:
        stream = open(  # noqa: SIM115 - the handler keeps the stream open and closes it
            self.baseFilename,
            self.mode,
            encoding=self.encoding,
            errors=self.errors,
            opener=_private_opener,
        )
        assert isinstance(stream, io.TextIOWrapper)  # a text mode ("a"), as the handler's
        return stream


class _HideTokens(logging.Filter):
    """The event stream takes the token in its query (`?token=`, for a browser's
    EventSource): the access log writes the path with `token=***` in its place."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        path = args[2] if isinstance(args, tuple) and len(args) >= 3 else None
        if isinstance(args, tuple) and isinstance(path, str) and "token=" in path:
            record.args = (*args[:2], _TOKEN.sub(r"\1***", path), *args[3:])
        return True


_TOKEN = re.compile(r"([?&]token=)[^&#]*")


def configure_logging(
    level: str,
    log_dir: Path | None,
    *,
    stderr: bool = True,
    max_bytes: int = MAX_BYTES,
    backups: int = BACKUPS,
) -> Path | None:
    """Route every log record (ours and uvicorn's) to `log_dir/aip.log`, rotated at
    `max_bytes` with `backups` old files kept, and to stderr when `stderr`. Returns the log
    file, or None when there is none (no `log_dir`, or it cannot be written: said on stderr)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level.upper())
    formatter = logging.Formatter(FORMAT)
    if stderr:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        root.addHandler(console)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _HideTokens) for f in access.filters):
        access.addFilter(_HideTokens())
    if log_dir is None:
        return None
    path = log_dir / LOG_FILE
    try:
        log_dir.mkdir(mode=LOG_DIR_MODE, parents=True, exist_ok=True)  # mode: if created
        file_handler = PrivateRotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    except OSError as exc:
        print(
            f"aip: cannot write the log in {log_dir} ({exc}); logging to stderr only",
            file=sys.stderr,
        )
        if not stderr:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(formatter)
            root.addHandler(console)
        return None
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)
    return path
