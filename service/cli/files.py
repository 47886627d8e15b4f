"""Which files `aip submit` sends, and opening each one: only regular files are read, and a FIFO
or a device is refused by name, never opened in a way that could wait on it."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from service.inbox.rules import IMAGE_SUFFIXES

NOT_REGULAR = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular(mode: int) -> str | None:
    """Why a file of this mode cannot be submitted, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in NOT_REGULAR if test(mode)), "a special file")
    return f"not a regular file ({kind}): only image files can be submitted"


def image_files(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to submit, in order: each file named, and the image files under each folder
    named (hidden ones skipped). Also what cannot be submitted, and why."""
    files: list[Path] = []
    refused: list[tuple[str, str]] = []
    for name in paths:
        path = Path(name)
        try:
            mode = path.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            refused.append((name, "no such file or folder"))
            continue
        except OSError as exc:
            refused.append((name, f"cannot read it ({exc.strerror or exc})"))
            continue
        if stat.S_ISDIR(mode):
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()  # a stat, not an open: a FIFO here is skipped, not waited on
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                refused.append((name, "a folder with no image files in it"))
            files.extend(found)
        elif (why := not_regular(mode)) is not None:
            refused.append((name, why))
        else:
            files.append(path)
    return files, refused


def open_regular(path: Path) -> BinaryIO:
    """The file, open for reading. Non-blocking, so a FIFO swapped in after `image_files`
    looked is refused at once instead of waiting for a writer; then only a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        why = not_regular(os.fstat(fd).st_mode)
        if why is not None:
            raise OSError(why)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
