"""The follow-up loop: answer queued follow-up questions one at a time on the model host's
inference thread (serialised with jobs there) and store each answer or its failure. Knows the
store and the host, not HTTP; a follow-up's failure is its own, never its job's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from PIL import Image

from service.config import Settings
from service.detection import Detection
from service.errors import JobFailure
from service.intake import open_for_models
from service.models.host import ModelHost
from service.pipeline import JobParams, reasoning_prompt
from service.policy import classify
from service.store import followups as store
from service.store.queue import Queue

log = logging.getLogger("aip.followups")


def job_prompt(ask: store.Ask, size: tuple[int, int]) -> str:
    """The prompt the job's reasoning was given, rebuilt from what the job stored."""
    detections = [
        Detection(label, (x1, y1, x2, y2), size) for label, x1, y1, x2, y2 in ask.detections
    ]
    return reasoning_prompt(JobParams.from_dict(ask.params).prompt, detections)


def answer(
    reasoner: Any, image: Image.Image, prompt: str, reasoning: str, question: str, tokens: int
) -> str:
    """On the model thread: the reasoner's answer, with the job's exchange before it."""
    follow_up = getattr(reasoner, "follow_up", None)
    if follow_up is None:
        raise JobFailure(
            "followups_unsupported", "this reasoner cannot answer follow-ups", transient=False
        )
    return str(follow_up(image, prompt, reasoning, question, max_tokens=tokens))


class FollowUps:
    def __init__(self, settings: Settings, queue: Queue, host: ModelHost) -> None:
        self.settings = settings
        self.queue = queue
        self.host = host
        self.current: tuple[int, int] | None = None  # (job id, n) being answered
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="aip-followups")

    async def stop(self) -> None:
        """Stop at once: a follow-up being answered stays `running` in the store and is
        queued again at the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        while True:
            if not self.host.ready:  # loading at start: the questions wait in the store
                await self._sleep(0.2)
                continue
            try:
                ask = await store.claim(self.queue)
            except Exception:
                log.exception("claiming a follow-up failed")
                await self._sleep(1.0)
                continue
            if ask is None:
                await self._sleep(self.settings.poll_interval_seconds)
                continue
            self.current = (ask.job_id, ask.n)
            try:
                await self.answer(ask)
            finally:
                self.current = None

    async def answer(self, ask: store.Ask) -> None:
        timings: dict[str, float] = {}
        began = time.perf_counter()
        try:
            try:
                image, size = await asyncio.to_thread(
                    open_for_models, self.settings.data_dir, ask.image_path
                )
            except FileNotFoundError:
                raise JobFailure(
                    "input_missing",
                    "the job's stored image is gone from the data directory (retention)",
                    transient=False,
                ) from None
            timings["decode"] = (time.perf_counter() - began) * 1000
            prompt = job_prompt(ask, size)
            reasoned = time.perf_counter()
            text = await self.host.infer(
                lambda _detector, reasoner: answer(
                    reasoner, image, prompt, ask.reasoning, ask.question, ask.max_tokens
                )
            )
            timings["reason"] = (time.perf_counter() - reasoned) * 1000
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            failure = classify(exc)
            log.warning(
                "follow-up %s/%s failed (%s: %s)", ask.job_id, ask.n, failure.code, failure.message
            )
            await store.fail(self.queue, ask.job_id, ask.n, failure.code, failure.message, timings)
            return
        timings["total"] = (time.perf_counter() - began) * 1000
        await store.finish(self.queue, ask.job_id, ask.n, text, timings)
        log.info("follow-up %s/%s answered in %.0f ms", ask.job_id, ask.n, timings["total"])

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(seconds, 0.01))
