"""Writes a file whole or not at all: a temporary file beside it, flushed to disk, renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomically(target: Path, write: Callable[[IO[bytes]], object]) -> None:
    """`write(out)` fills a temporary file in `target`'s folder (created if missing), which
    then replaces `target` in one rename, so a crash never leaves a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_once(target: Path, data: bytes) -> None:
    """A content-named file: written atomically unless one with as many bytes is already
    there, which only gets a fresh mtime (a retention run in progress then leaves it)."""
    try:
        if target.stat().st_size == len(data):
            os.utime(target)
            return
    except FileNotFoundError:
        pass
    write_atomically(target, lambda out: out.write(data))
