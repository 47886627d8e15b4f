"""Start-up repair of the ledger after a crash between moving a file and recording the move: the
row learns where its file went (its note and sidecar follow), found by the same name rule,
size and mtime that filing keeps. Runs only when the inbox moves files."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.inbox.filing import write_duplicate, write_error
from service.inbox.rules import kind_of, sidecar_of
from service.store.ledger import Entry, FileSeen, Ledger


@dataclass
class Repairs:
    filed: int = 0  # rows that now say where their file went
    missing: int = 0  # rows whose file is neither in the inbox nor filed: left as they are


def folder_for(entry: Entry) -> str:
    return "failed" if entry.outcome == "rejected" else "processed"


def find_filed(
    root: Path,
    file: FileSeen,
    folder: str,
    taken: set[str],
    listings: dict[Path, list[str]] | None = None,
) -> str | None:
    """The filed copy of `file` under `folder/`: its own name or `stem-N.ext` (the names
    filing picks), with the size and mtime it had, and not already another row's.
    `listings` caches folder contents across calls."""
    relative = PurePosixPath(file.relative_path)
    here = root / folder / relative.parent
    listings = {} if listings is None else listings
    if here not in listings:
        try:
            listings[here] = [entry.name for entry in os.scandir(here)]
        except OSError:
            listings[here] = []
    pattern = re.compile(rf"{re.escape(relative.stem)}(-\d+)?{re.escape(relative.suffix)}")
    names = sorted((n for n in listings[here] if pattern.fullmatch(n)), key=lambda n: (len(n), n))
    for name in names:
        candidate = (PurePosixPath(folder) / relative.parent / name).as_posix()
        try:
            info = (root / candidate).lstat()
        except OSError:
            continue
        if candidate not in taken and (info.st_size, info.st_mtime_ns) == (
            file.size,
            file.mtime_ns,
        ):
            return candidate
    return None


def _locate(
    root: Path, rows: list[tuple[Entry, FileSeen]], taken: set[str]
) -> tuple[list[tuple[Entry, str, str]], int]:
    """(entry, dropped path, filed path) for each row found filed; how many are nowhere."""
    found: list[tuple[Entry, str, str]] = []
    missing = 0
    listings: dict[Path, list[str]] = {}
    for entry, file in rows:
        if (root / file.relative_path).exists():
            continue  # still in the inbox: the watcher files it when it sees it again
        filed = find_filed(root, file, folder_for(entry), taken, listings)
        if filed is None:
            missing += 1
            continue
        taken.add(filed)
        found.append((entry, file.relative_path, filed))
    return found, missing


async def repair_unfiled(ledger: Ledger, root: Path) -> Repairs:
    """Give every row whose file was moved but not recorded its `filed_to`, and the note
    (`.error.json`, `.duplicate.json`) and sidecar the crash kept from following it. A row
    whose file is nowhere (the user took it away) stays unfiled: it still stops the same
    file, should it come back unchanged, from becoming a second job."""
    taken = await ledger.filed_paths()
    found, missing = await asyncio.to_thread(_locate, root, await ledger.unfiled(), taken)
    for entry, relative, filed in found:
        await asyncio.to_thread(_follow_up, root, entry, relative, filed)
        await ledger.filed(entry, filed)
    return Repairs(filed=len(found), missing=missing)


def _follow_up(root: Path, entry: Entry, relative: str, filed: str) -> None:
    sidecar = sidecar_of(relative) if kind_of(relative) == "image" else None
    if sidecar is not None and (root / sidecar).is_file():
        companion = PurePosixPath(filed).with_suffix(".json").as_posix()
        if not (root / companion).exists():
            (root / sidecar).rename(root / companion)
    if entry.outcome == "rejected" and not (root / f"{filed}.error.json").exists():
        write_error(root, filed, entry.error_code or "rejected", entry.error_message or "rejected")
    if (
        entry.outcome == "duplicate"
        and entry.job_id is not None
        and not (root / f"{filed}.duplicate.json").exists()
    ):
        write_duplicate(root, filed, entry.job_id)
