"""Which stored copy of a job's image may be handed out: a redacting job's redacted copy, never
its original; fetched from the image store when another node wrote it. For the image route,
the annotated image, flight reports and change pictures alike."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from service.errors import Gone
from service.redact import redacted_copy
from service.services import Services


@dataclass(frozen=True)
class HandedOut:
    path: Path  # on this node
    relative: str  # to the data directory, as stored
    format: str  # PNG | JPEG for a redacted copy; the original's format otherwise


async def handed_out(svc: Services, job_id: int) -> HandedOut:
    """The copy; Conflict while a redacted copy is still to be written (redacted_copy says
    which), Gone once the stored image was removed."""
    image = await svc.reads.image_of(job_id)
    files = svc.files
    wanted = image.redacted_path if image.redact else image.path
    if wanted is not None and (image.redact or image.pruned_at is None):
        with contextlib.suppress(FileNotFoundError):  # said below, as for a local file
            await files.local(wanted)  # written by another node, perhaps
    copy = redacted_copy(files.root, job_id, image.redact, image.redacted_path, image.job_status)
    if copy is not None:
        return HandedOut(copy, str(image.redacted_path), "PNG" if copy.suffix == ".png" else "JPEG")
    path = files.path(image.path)
    if image.pruned_at is not None or not path.is_file():
        raise Gone(
            f"job {job_id}'s stored image is no longer in the data directory", code="image_gone"
        )
    return HandedOut(path, image.path, image.format)
