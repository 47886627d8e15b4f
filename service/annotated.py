"""A job's image with its numbered boxes drawn, on the copy the job may hand out (the redacted
one when it redacts): for the annotated-image route and the flight reports."""

from __future__ import annotations

import asyncio
from typing import Any

from service.annotate import annotate, to_jpeg
from service.errors import Gone
from service.handout import handed_out
from service.intake import open_stored
from service.services import Services


async def annotated_jpeg(svc: Services, job: dict[str, Any]) -> bytes:
    """The JPEG; Gone when the stored image was removed, Conflict while a redacted copy is
    still to be written."""
    source = await handed_out(svc, job["id"])
    detections = (job.get("result") or {}).get("detections") or []

    def render() -> bytes:
        return to_jpeg(annotate(open_stored(svc.files.root, source.relative), detections))

    try:
        return await asyncio.to_thread(render)
    except FileNotFoundError:
        raise Gone(
            f"job {job['id']}'s stored image is no longer in the data directory",
            code="image_gone",
        ) from None
