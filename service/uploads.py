"""An image's way into the queue from memory: inspected and stored by content (no more at once
than the intake slots allow), then its new job announced. For uploads to the jobs route and
the jobs the service makes itself (change descriptions)."""

from __future__ import annotations

import asyncio

from service.intake import ImageRecord, inspect_image
from service.services import Services


async def store_image(svc: Services, data: bytes) -> ImageRecord:
    """Validated (InvalidInput, UnsupportedMedia or PayloadTooLarge when not) and stored."""
    async with svc.intake_slots:
        record = await asyncio.to_thread(inspect_image, data, max_pixels=svc.settings.max_pixels)
        await svc.files.put(record.path, data)
    return record


def announce(svc: Services, job_id: int, source: str, name: str) -> None:
    """Said before anything can claim the job: call with no await since its commit."""
    svc.events.publish("job.created", {"source": source, "input_name": name}, job_id=job_id)
    svc.worker.notify()
