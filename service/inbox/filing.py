"""Moving originals out of the way once handled: atomic, keeping subfolders, never overwriting."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path, PurePosixPath


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
    target.parent.mkdir(parents=True, exist_ok=True)
    moved = _move_no_clobber(root / relative_path, target)
    for companion in companions:
        source = root / companion
        if source.is_file():
            # A companion follows its file's final name, so frame-1.jpg keeps frame-1.json.
            _move_no_clobber(source, moved.with_suffix(PurePosixPath(companion).suffix))
    return moved.relative_to(root).as_posix()


def write_error(root: Path, filed_relative: str, code: str, message: str) -> None:
    """`failed/x/NAME.ext` gets `failed/x/NAME.ext.error.json` beside it."""
    path = root / f"{filed_relative}.error.json"
    path.write_text(json.dumps({"code": code, "message": message}, indent=2) + "\n")
