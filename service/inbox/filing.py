"""Moving originals out of the way once handled: atomic, keeping subfolders, never overwriting,
with a note beside a file that was refused or duplicated. What it creates takes the inbox's own
permissions: the service's private umask is for its data, not for the user's folder."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any


def _free_name(target: Path) -> Path:
    if not target.exists():
        return target
    for n in range(1, 100_000):
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"no free name for {target}")


def _move_no_clobber(source: Path, target: Path) -> Path:
    """Rename without ever replacing an existing file (a link fails if the name is taken)."""
    while True:
        target = _free_name(target)
        try:
            os.link(source, target)
        except FileExistsError:
            continue  # taken between the check and the link: try the next name
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            os.replace(source, target)  # no hard links here (exFAT, SMB): name is free
            return target
        os.unlink(source)
        return target


def file_away(root: Path, relative_path: str, folder: str, companions: list[str]) -> str:
    """Move `relative_path` (and its companions, e.g. a sidecar) to `folder/` under the inbox,
    keeping the subfolder; returns the new path relative to the inbox."""
    target = root / folder / relative_path
    make_folders(root, target.parent)
    moved = _move_no_clobber(root / relative_path, target)
    for companion in companions:
        source = root / companion
        if source.is_file():
            # A companion follows its file's final name, so frame-1.jpg keeps frame-1.json.
            _move_no_clobber(source, moved.with_suffix(PurePosixPath(companion).suffix))
    return moved.relative_to(root).as_posix()


def make_folders(root: Path, folder: Path) -> None:
    """Create `folder` (under `root`) and its missing parents with `root`'s mode."""
    mode = stat.S_IMODE(root.stat().st_mode)
    missing = []
    while not folder.is_dir() and folder != root:
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue  # made by a file filed at the same moment
        new.chmod(mode)


def _write_note(root: Path, filed_relative: str, kind: str, body: dict[str, Any]) -> None:
    """`x/NAME.ext` gets `x/NAME.ext.KIND.json` beside it, as readable as the file itself."""
    filed = root / filed_relative
    mode = stat.S_IMODE(filed.stat().st_mode) & 0o666
    fd = os.open(f"{filed}.{kind}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(body, indent=2) + "\n")


def write_error(root: Path, filed_relative: str, code: str, message: str) -> None:
    """`failed/x/NAME.ext` gets `failed/x/NAME.ext.error.json` beside it."""
    _write_note(root, filed_relative, "error", {"code": code, "message": message})


def write_duplicate(root: Path, filed_relative: str, job_id: int) -> None:
    """`processed/x/NAME.ext` gets `processed/x/NAME.ext.duplicate.json` naming the job that
    already has its content, and how to run it again anyway."""
    message = (
        f"the same image as job {job_id}, so no new job was made; to process this file again, "
        f"run `aip inbox reprocess {filed_relative}`, or drop it again with a sidecar "
        f'{PurePosixPath(filed_relative).stem}.json holding {{"reprocess": true}}'
    )
    _write_note(root, filed_relative, "duplicate", {"duplicate_of": job_id, "message": message})
