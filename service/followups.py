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
from service.grounding import grounded_prompt
from service.intake import open_for_models
from service.models.host import ModelHost
from service.nodes import new_node_id
from service.params import JobParams
from service.policy import classify
from service.store import followups as store
from service.store.files import StoredFiles
from service.store.queue import Queue
from service.store.reads import Reads

log = logging.getLogger("aip.followups")

# Questions come through /ask, which wakes the loop, or are left queued by a stop, which the
# first pass finds: this slow look is only a backstop.
IDLE_POLL_SECONDS = 30.0


def job_prompt(ask: store.Ask, size: tuple[int, int]) -> str:
    """The prompt the job's reasoning was given, rebuilt from what the job stored (a job that
    was also shown a marks image or crops is asked about the image alone)."""
    detections = [
        Detection(label, (x1, y1, x2, y2), size) for label, x1, y1, x2, y2 in ask.detections
    ]
    params = JobParams.from_dict(ask.params)
    return grounded_prompt(params.prompt, detections, size, schema=params.response_schema)


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
    """The loop, and the one event its waiters watch: set when a follow-up ends."""

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        host: ModelHost,
        reads: Reads,
        *,
        files: StoredFiles | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.files = files or StoredFiles.of(settings, queue)
        self.host = host
        self.reads = reads
        self.owner = new_node_id()  # whose lease a claimed follow-up carries
        # No heartbeat: an answer holds its follow-up for as long as a job may run.
        self.lease_seconds = settings.job_timeout_seconds + settings.lease_seconds
        self.current: tuple[int, int] | None = None  # (job id, n) being answered
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self._stopping = False
        self._deadline = 0.0  # monotonic: when a follow-up still running is put back
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """A question was stored: look for it now."""
        self._wake.set()

    def ended(self) -> asyncio.Event:
        """Set once the next follow-up ends (answered, failed, or put back at a stop): take
        it before reading a follow-up's state, then wait on it, and no end is missed."""
        return self._ended

    def _announce_end(self) -> None:
        ended, self._ended = self._ended, asyncio.Event()
        ended.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="aip-followups")

    def stop_claiming(self, grace: float | None = None) -> None:
        """Shutdown began: claim nothing more; a follow-up being answered has `grace` seconds
        (the shutdown grace by default) before `stop` puts it back."""
        if not self._stopping:
            grace = self.settings.shutdown_grace_seconds if grace is None else grace
            self._deadline = time.monotonic() + grace
            self._stopping = True
        self._wake.set()

    async def stop(self) -> None:
        """Stop: a follow-up still being answered when the grace ends is queued again (never
        left `running`), and answered at the next start."""
        self.stop_claiming()
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            left = max(self._deadline - time.monotonic(), 0.0)
            await asyncio.wait_for(asyncio.shield(self._task), timeout=left)
        if self._task.done():
            return
        running = self.current
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if running is not None:
            await store.release(self.queue, *running, self.owner)
            log.warning("follow-up %s/%s put back: answered at the next start", *running)
            self._announce_end()

    async def run(self) -> None:
        while not self._stopping:
            if not self.host.ready:  # loading at start: the questions wait in the store
                await asyncio.sleep(0.2)
                continue
            # Cleared before looking: a question stored from here on wakes the sleep below.
            self._wake.clear()
            try:
                # A read first: an idle service takes no write transaction to find nothing.
                ask = (
                    await store.claim(self.queue, self.owner, self.lease_seconds)
                    if await self.reads.run(store.pending)
                    else None
                )
            except Exception:
                log.exception("claiming a follow-up failed")
                await self._sleep(1.0)
                continue
            if ask is None:
                await self._sleep(IDLE_POLL_SECONDS)
                continue
            self.current = (ask.job_id, ask.n)
            try:
                await self.answer(ask)
            finally:
                self.current = None
            self._announce_end()

    def _image(self, ask: store.Ask) -> tuple[Image.Image, tuple[int, int]]:
        """The job's stored original; once a redacting job's original is deleted
        (`keep_original: false`), its redacted copy."""
        for path in (ask.image_path, ask.redacted_path):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    return open_for_models(self.files.root, path)
        raise JobFailure(
            "input_missing",
            "the job's stored image is gone from the data directory (retention)",
            transient=False,
        )

    async def answer(self, ask: store.Ask) -> None:
        timings: dict[str, float] = {}
        served: dict[str, Any] = {}
        began = time.perf_counter()
        try:
            for path in (ask.image_path, ask.redacted_path):  # another node may have them
                if path:
                    with contextlib.suppress(FileNotFoundError):
                        await self.files.local(path)
                        break
            image, size = await asyncio.to_thread(self._image, ask)
            timings["decode"] = (time.perf_counter() - began) * 1000
            prompt = job_prompt(ask, size)
            reasoned = time.perf_counter()
            text = await self.host.infer(
                lambda _detector, reasoner: answer(
                    reasoner, image, prompt, ask.reasoning, ask.question, ask.max_tokens
                ),
                served=served,
            )
            timings["reason"] = (time.perf_counter() - reasoned) * 1000
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            failure = classify(exc)
            log.warning(
                "follow-up %s/%s failed (%s: %s)", ask.job_id, ask.n, failure.code, failure.message
            )
            await store.fail(
                self.queue,
                ask,
                self.owner,
                failure.code,
                failure.message,
                timings,
                served.get("reasoner"),
            )
            return
        timings["total"] = (time.perf_counter() - began) * 1000
        if not await store.finish(
            self.queue, ask, self.owner, text, timings, served.get("reasoner")
        ):
            log.warning(
                "follow-up %s/%s: answered after another node took it over", ask.job_id, ask.n
            )
            return
        log.info("follow-up %s/%s answered in %.0f ms", ask.job_id, ask.n, timings["total"])

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(seconds, 0.01))
