"""Processing an inbox file again on purpose (`POST /v1/inbox/reprocess`): a file named inside
the inbox, filed or not, becomes a new job with the parameters it was dropped with. The file
stays where it is; the path is confined to the inbox without following symlinks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from service.config import Settings
from service.confine import read_confined
from service.errors import AipError, Forbidden
from service.inbox.rules import ParamsError, params_for, sidecar_of, unfiled_path
from service.intake import inspect_image
from service.jobspec import Profiles, resolve
from service.store.files import StoredFiles
from service.store.ledger import FileSeen, Ledger


def _read(inbox: Path, raw: str, max_bytes: int) -> tuple[bytes, str, int]:
    """The file's bytes, its path relative to the inbox and its mtime."""
    root = inbox.resolve()
    try:
        path = Path(raw) if os.path.isabs(raw) else inbox / raw
        data, where = read_confined(str(path), (inbox,), max_bytes)
    except AipError as exc:
        if exc.code != "path_not_allowed":
            raise
        raise Forbidden(
            f"{raw} is not a file inside the inbox {root} (symbolic links are not followed); "
            "name one there or in its processed/ or failed/ folders, relative to the inbox "
            "or absolute",
            code="path_not_allowed",
        ) from None
    relative = Path(where).relative_to(root).as_posix()
    try:
        mtime_ns = os.stat(where, follow_symlinks=False).st_mtime_ns
    except OSError:
        mtime_ns = 0  # replaced since it was read: the bytes read are what the job gets
    return data, relative, mtime_ns


async def reprocess_file(
    settings: Settings,
    ledger: Ledger,
    raw: str,
    profiles: Profiles | None = None,
    files: StoredFiles | None = None,
) -> int:
    """Queue a new job for the inbox file `raw` even when its content was seen before; the
    job id. Folder configs apply from where the file was dropped, its sidecar from beside it."""
    root = settings.inbox_dir.resolve()
    data, relative, mtime_ns = await asyncio.to_thread(
        _read, settings.inbox_dir, raw, settings.max_upload_bytes
    )
    try:
        found = await asyncio.to_thread(
            params_for, root, unfiled_path(relative), sidecar_of(relative)
        )
    except ParamsError as exc:
        raise AipError(str(exc), code="invalid_params") from None
    params = await resolve(found.given, found.folder, profiles, settings)
    image = await asyncio.to_thread(inspect_image, data, max_pixels=settings.max_pixels)
    await (files or StoredFiles(settings.data_dir)).put(image.path, data)
    entry = await ledger.accept(
        FileSeen(relative, len(data), mtime_ns),
        image,
        params.to_dict(),
        max_attempts=found.max_attempts or settings.max_attempts,
        reprocess=True,
        filed_to=relative,  # it stays where it is
    )
    assert entry.job_id is not None
    return entry.job_id
