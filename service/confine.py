"""Reads a file a client named by path, confined to the allowed folders without races: every
component below an allowed folder is opened relative to its parent's descriptor, never through a
symlink, and only a regular file is read. Knows no HTTP and nothing about images."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from service.errors import Forbidden, InvalidInput, NotFound, PayloadTooLarge

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_STEP_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW
# O_NONBLOCK: opening a FIFO (or a device) must never wait for a writer.
_FILE_FLAGS = (
    os.O_RDONLY
    | os.O_NOFOLLOW
    | os.O_NONBLOCK
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_SETTING = "AIP_ALLOWED_DIRS"


def _outside(raw: str, why: str) -> Forbidden:
    return Forbidden(
        f"{raw} {why}; name a file inside the folders this service may read ({_SETTING})",
        code="path_not_allowed",
    )


def _absolute(raw: str) -> Path:
    if "\x00" in raw:
        raise InvalidInput("the path contains a NUL character", code="invalid_path")
    try:
        os.fsencode(raw)
    except UnicodeError:
        raise InvalidInput(
            "the path is not valid text (a lone surrogate?); send it as UTF-8",
            code="invalid_path",
        ) from None
    try:
        path = Path(raw).expanduser()
        return path if path.is_absolute() else Path.cwd() / path
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidInput(f"not a usable path: {exc}", code="invalid_path") from None


def _below(path: Path, root: Path) -> tuple[str, ...] | None:
    """The components of `path` under `root`, compared as written (no symlink is followed)."""
    configured = Path(os.path.normpath(root.expanduser().absolute()))
    forms = [configured]
    with contextlib.suppress(OSError, RuntimeError):
        forms.append(configured.resolve())
    for form in forms:
        if path.parts[: len(form.parts)] == form.parts:
            return path.parts[len(form.parts) :]
    return None


@contextlib.contextmanager
def _opened(path: str | Path, flags: int, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _refusal(raw: str, exc: OSError, name: str, dir_fd: int, *, last: bool) -> Exception:
    """Turn a failed step into the error a client can act on."""
    if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_symlink(name, dir_fd)):
        return _outside(raw, f"goes through a symbolic link ({name}), which is not followed")
    if exc.errno == errno.ENOENT:
        return NotFound(f"no file at {raw}: check the path", code="file_not_found")
    if exc.errno == errno.ENOTDIR and not last:
        return NotFound(f"no file at {raw}: {name} is not a folder", code="file_not_found")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Forbidden(
            f"this service has no permission to read {raw}; make the file readable by the "
            "user the service runs as",
            code="permission_denied",
        )
    return InvalidInput(f"not a usable path: {raw}: {exc.strerror}", code="invalid_path")


def _read_regular(raw: str, fd: int, max_bytes: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise InvalidInput(
            f"{raw} is {kind}; name the image file itself", code="not_a_regular_file"
        )
    if info.st_size > max_bytes:
        raise PayloadTooLarge(
            f"the file is {info.st_size:,} bytes; the limit is {max_bytes:,} (AIP_MAX_UPLOAD_BYTES)"
        )
    os.set_blocking(fd, True)
    chunks, size = [], 0
    while size <= max_bytes:
        chunk = os.read(fd, min(1024 * 1024, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:  # it grew while being read
        raise PayloadTooLarge(
            f"the file is larger than {max_bytes:,} bytes, the limit (AIP_MAX_UPLOAD_BYTES)"
        )
    return b"".join(chunks)


def _walk(raw: str, root: Path, parts: tuple[str, ...], max_bytes: int) -> bytes:
    # The allowed folder itself is resolved: where it points is the administrator's choice.
    # Below it, nothing is followed, and each step holds its parent open, so swapping a folder
    # for a symlink between steps cannot redirect the walk.
    with contextlib.ExitStack() as stack:
        try:
            dir_fd = stack.enter_context(_opened(root.expanduser().resolve(), _DIR_FLAGS))
        except (OSError, RuntimeError) as exc:
            raise NotFound(
                f"the allowed folder {root} cannot be opened ({exc}); create it or fix {_SETTING}",
                code="file_not_found",
            ) from None
        for index, name in enumerate(parts):
            last = index == len(parts) - 1
            try:
                fd = stack.enter_context(
                    _opened(name, _FILE_FLAGS if last else _STEP_FLAGS, dir_fd=dir_fd)
                )
            except OSError as exc:
                raise _refusal(raw, exc, name, dir_fd, last=last) from None
            if last:
                return _read_regular(raw, fd, max_bytes)
            dir_fd = fd
    raise AssertionError("unreachable: parts is never empty here")


def read_confined(raw: str, allowed: tuple[Path, ...], max_bytes: int) -> tuple[bytes, str]:
    """The bytes of the regular file `raw` names inside one of `allowed`, and the path it was
    read from. Refuses `..`, any symlink below the allowed folder, and anything not a regular
    file; opening never blocks (a FIFO is refused, not waited on)."""
    if not allowed:
        raise Forbidden(
            f"path submissions are off: set {_SETTING} to the folders clients may name",
            code="path_not_allowed",
        )
    path = _absolute(raw)
    if ".." in path.parts:
        raise _outside(raw, "contains `..`")
    for root in allowed:
        parts = _below(path, root)
        if parts is None:
            continue
        if not parts:
            raise InvalidInput(
                f"{raw} is a folder; name the image file itself", code="not_a_regular_file"
            )
        data = _walk(raw, root, parts, max_bytes)
        return data, str(Path(root.expanduser().resolve(), *parts))
    raise _outside(raw, "is outside the folders this service may read")
