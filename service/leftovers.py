"""Start-up cleanup of what a crash leaves in the image store: `.incoming-*` temporary files of
writes that never finished. Run while holding the data-directory lock, when no write can be in
flight; it knows file names only, never the database."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("aip")

INCOMING_PREFIX = ".incoming-"


def remove_unfinished_images(images_dir: Path, *, older_than_seconds: float = 0.0) -> int:
    """Delete `.incoming-*` files under `images_dir` (those older than `older_than_seconds`:
    0 is only safe for the data directory's lock holder at start); returns how many."""
    removed = 0
    cutoff = time.time() - older_than_seconds
    for folder, _dirs, files in os.walk(images_dir):
        for name in files:
            if not name.startswith(INCOMING_PREFIX):
                continue
            path = Path(folder, name)
            try:
                if older_than_seconds and path.lstat().st_mtime > cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
    if removed:
        log.info("removed %d unfinished image writes left by a crash in %s", removed, images_dir)
    return removed
