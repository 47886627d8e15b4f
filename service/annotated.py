"""A job's image with its numbered boxes drawn, on the copy the job may hand out (the redacted
one when it redacts): for the annotated-image route and the flight reports."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from service.annotate import annotate, to_jpeg
from service.errors import Gone
from service.intake import open_stored
from service.redact import redacted_copy
from service.services import Services


async def annotated_jpeg(svc: Services, job: dict[str, Any]) -> bytes:
    """The JPEG; Gone when the stored image was removed, Conflict while a redacted copy is
    still to be written (redacted_copy says which)."""
    job_id = job["id"]
    image_row = await svc.reads.image_of(job_id)
    # A job that redacts is drawn on its redacted copy, never on the original.
    wanted = image_row.redacted_path if image_row.redact else image_row.path
    if wanted is not None and (image_row.redact or image_row.pruned_at is None):
        with contextlib.suppress(FileNotFoundError):  # said below, as for a local file
            await svc.files.local(wanted)  # written by another node, perhaps
    copy = redacted_copy(
        svc.files.root,
        job_id,
        image_row.redact,
        image_row.redacted_path,
        image_row.job_status,
    )
    if copy is None and image_row.pruned_at is not None:
        raise Gone(f"job {job_id}'s stored image was removed by retention", code="image_gone")
    source = image_row.path if copy is None else str(image_row.redacted_path)
    detections = (job.get("result") or {}).get("detections") or []

    def render() -> bytes:
        return to_jpeg(annotate(open_stored(svc.files.root, source), detections))

    try:
        return await asyncio.to_thread(render)
    except FileNotFoundError:
        raise Gone(
            f"job {job_id}'s stored image is no longer in the data directory", code="image_gone"
        ) from None
