"""Maintenance steps run forever at an interval; a step that fails is logged and run again
at the next interval, never ending the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


async def every(
    seconds: float,
    step: Callable[[], Awaitable[object]],
    *,
    what: str,
    log: logging.Logger,
    at_start: bool = False,
) -> None:
    if not at_start:
        await asyncio.sleep(seconds)
    while True:
        try:
            await step()
        except Exception:
            log.exception("%s failed; trying again in %g s", what, seconds)
        await asyncio.sleep(seconds)
