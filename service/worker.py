"""The drain loop: claim a job, decode its image, run the pipeline on the model thread while
heartbeating the lease, then persist the outcome. Knows the queue and the host, not HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from service.config import Settings
from service.errors import DiskFull, JobFailure
from service.models.host import ModelHost
from service.pipeline import JobParams, analyse
from service.policy import backoff_seconds, classify, pause_seconds
from service.prefetch import Prefetch
from service.store.queue import Claim, ClaimNext, Outcome, Queue

log = logging.getLogger("aip.worker")


class StopJob(Exception):
    """Raised at a stage boundary to abandon the running job (cancel, timeout, shutdown)."""

    def __init__(self, why: str, message: str) -> None:
        super().__init__(message)
        self.why = why
        self.message = message


class Worker:
    def __init__(self, settings: Settings, queue: Queue, host: ModelHost) -> None:
        self.settings = settings
        self.queue = queue
        self.host = host
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.current: Claim | None = None
        self.stage: str | None = None  # what the current job is doing, for `aip submit --wait`
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._job_done = asyncio.Event()
        self._stop_reason: tuple[str, str] | None = None
        self._stop_flag = threading.Event()
        self._hurry = asyncio.Event()  # a second stop signal: hand the job back now
        self._announced = False
        self._disk_strikes = 0  # writes refused by a full disk since the last job was saved
        self._pause_for_disk = False
        self._claim_errors = 0
        self._claim_error_logged = float("-inf")
        self.prefetch = Prefetch(settings.data_dir, queue)

    def notify(self) -> None:
        """A job was queued: stop sleeping (busy: decode the next job's image meanwhile)."""
        self._wake.set()
        if self.current is not None:
            self.prefetch.ahead()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="aip-worker")

    async def run(self) -> None:
        following: Claim | None = None  # claimed in the commit that ended the last job
        claim: Claim | None
        while not self._stopping:
            if following is not None:
                claim, following = following, None
            else:
                if self._pause_for_disk:
                    self._pause_for_disk = False
                    await self._wait_for_space(pause_seconds(self._disk_strikes))
                    continue
                try:
                    claim = await self.queue.claim(self.id, self.settings.lease_seconds)
                except DiskFull:  # said by the queue, at most once a minute
                    self._disk_full()
                    continue
                except Exception:
                    await self._claim_failed()
                    continue
                self._claim_errors = 0
                if claim is None:
                    await self._sleep()
                    continue
            self._job_done.clear()
            self.current = claim
            try:
                following = await self.process(claim)
            except DiskFull:
                await self._hand_back(claim)
            except Exception:  # the loop must survive anything one job does
                log.exception("job %s: unexpected error while finishing it", claim.job_id)
            finally:
                self.current = None
                self._job_done.set()
        if following is not None:  # claimed as the stop began: back to its place, not run
            try:
                await self.queue.release(following)
            except DiskFull:
                log.warning("job %s could not be handed back: the disk is full", following.job_id)

    def _claim_next(self) -> ClaimNext | None:
        """What to claim in the commit that ends the running job: nothing once stopping or
        pausing for a full disk, else the next job, saving the separate claim's commit."""
        if self._stopping or self._pause_for_disk:
            return None
        return ClaimNext(self.id, self.settings.lease_seconds)

    def _disk_full(self) -> None:
        self._disk_strikes += 1
        self._pause_for_disk = True

    async def _hand_back(self, claim: Claim) -> None:
        """The job's outcome could not be written for want of space: it goes back to its
        place in the queue, its attempt not counted, and runs again once space is back."""
        self._disk_full()
        why = JobFailure(
            "disk_full", "handed back: the disk was full when its result was saved", transient=True
        )
        # Still full: the queue writes the hand-back with the next claim that gets through.
        with contextlib.suppress(DiskFull):
            await self.queue.release(claim, why)
        log.debug("job %s handed back to the queue: the disk is full", claim.job_id)

    async def _wait_for_space(self, seconds: float) -> None:
        """Back off after a full disk refused a write: until `seconds` pass, or sooner once
        enough space is freed (checked each second), or the worker stops."""
        deadline = time.monotonic() + seconds
        while not self._stopping and not self.queue.disk.space_back():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(1.0, left))

    async def _claim_failed(self) -> None:
        self._claim_errors += 1
        delay = pause_seconds(self._claim_errors, base=0.5)
        if time.monotonic() - self._claim_error_logged >= 60:
            self._claim_error_logged = time.monotonic()
            log.exception("claiming a job failed; trying again in %g s", delay)
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _sleep(self) -> None:
        timeout = self.settings.poll_interval_seconds
        next_at = await self.queue.next_run_after()
        if next_at is not None:
            timeout = min(timeout, max(next_at - time.time(), 0.0))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.01))

    async def process(self, claim: Claim) -> Claim | None:
        """Run one claimed job to its end; returns the next job, claimed in the same commit
        that recorded this one's end (None: none was ready, or none was wanted)."""
        began = time.perf_counter()
        timings: dict[str, float] = {
            "queue_wait": max(claim.started_at - claim.created_at, 0) * 1000
        }
        self._stop_reason = None
        self._stop_flag.clear()
        deadline = time.monotonic() + self.settings.job_timeout_seconds
        heartbeat = asyncio.create_task(self._heartbeat(claim, deadline))
        models = self.host.identity()  # until infer() names the models that ran the job
        try:
            params = JobParams.from_dict(claim.params)
            self.stage = "decode"
            decode_began = time.perf_counter()
            try:
                image, original_size = await self.prefetch.take(claim.image_path)
            except FileNotFoundError:
                raise JobFailure(
                    "input_missing",
                    f"the stored input {claim.image_path} is gone from the data directory",
                    transient=False,
                ) from None
            except (OSError, ValueError, SyntaxError) as exc:
                raise JobFailure(
                    "corrupt_image",
                    f"the stored image could not be decoded: {exc}",
                    transient=False,
                ) from exc
            timings["decode"] = (time.perf_counter() - decode_began) * 1000
            self.prefetch.ahead()  # the next job's decode overlaps this one's inference
            analysis = await self.host.infer(
                lambda detector, reasoner: analyse(
                    image,
                    params,
                    detector,
                    reasoner,
                    detect_tokens=self.settings.detect_max_tokens,
                    reason_tokens=self.settings.reason_max_tokens,
                    checkpoint=self._checkpoint,
                    original_size=original_size,
                ),
                served=models,  # the exact models that ran it, taken in the same step
            )
            timings.update(analysis.timings)
        except StopJob as stop:
            return await self._stopped(claim, stop, timings, models)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            failure = classify(exc)
            retry_in = (
                backoff_seconds(claim.round_attempt, base=self.settings.retry_base_seconds)
                if failure.transient
                else None
            )
            status, following = await self.queue.fail(
                claim,
                failure,
                retry_in=retry_in,
                timings=timings,
                models=models,
                claim_next=self._claim_next(),
            )
            log.warning(
                "job %s attempt %s failed (%s: %s) -> %s",
                claim.job_id,
                claim.attempt,
                failure.code,
                failure.message,
                status or "lease lost",
            )
            return following
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        timings["total"] = (time.perf_counter() - began) * 1000 + timings["queue_wait"]
        outcome = Outcome(analysis.detections, analysis.reasoning, timings, models)
        self.stage = "persist"
        done, following = await self.queue.complete(claim, outcome, claim_next=self._claim_next())
        if done:
            self._disk_strikes = 0
            log.info(
                "job %s succeeded: %d detections in %.0f ms",
                claim.job_id,
                len(analysis.detections),
                timings["total"] - timings["queue_wait"],
            )
        else:
            log.warning("job %s: lease lost before completion; result discarded", claim.job_id)
        return following

    def _checkpoint(self, stage: str) -> None:
        """Called on the model thread between stages."""
        self.stage = stage
        if self._stop_flag.is_set() and self._stop_reason is not None:
            why, message = self._stop_reason
            raise StopJob(why, f"{message} (before {stage})")

    def cancel(self, job_id: int) -> None:
        """Stop the running job at its next stage boundary, if it is this one."""
        if self.current is not None and self.current.job_id == job_id:
            self._request_stop("cancelled", "cancelled while running")

    def _request_stop(self, why: str, message: str) -> None:
        self._stop_reason = (why, message)
        self._stop_flag.set()

    async def _heartbeat(self, claim: Claim, deadline: float) -> None:
        interval = max(self.settings.lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0.01)))
            if time.monotonic() >= deadline:
                self._request_stop(
                    "timeout", f"timed out after {self.settings.job_timeout_seconds:g} s"
                )
            try:
                beat = await self.queue.heartbeat(claim, self.settings.lease_seconds)
            except DiskFull:  # the job runs on; its result is small and space may come back
                continue
            except Exception:
                log.exception("job %s: heartbeat failed", claim.job_id)
                continue
            if not beat.owned:
                self._request_stop("lease_lost", "the lease was lost")
                return
            if beat.cancel_requested:
                self._request_stop("cancelled", "cancelled while running")

    async def _stopped(
        self, claim: Claim, stop: StopJob, timings: dict[str, float], models: dict[str, Any]
    ) -> Claim | None:
        following = None
        if stop.why == "cancelled":
            _, following = await self.queue.finish_cancelled(
                claim, stop.message, claim_next=self._claim_next()
            )
        elif stop.why == "timeout":
            failure = JobFailure("timeout", stop.message, transient=False)
            _, following = await self.queue.fail(
                claim,
                failure,
                retry_in=None,
                timings=timings,
                models=models,
                claim_next=self._claim_next(),
            )
        elif stop.why == "shutdown":
            await self.queue.release(claim)
        log.info("job %s stopped: %s", claim.job_id, stop.message)
        return following

    def stop_signalled(self, again: bool) -> None:
        """A stop signal arrived (on the event loop's thread): the first says what shutdown
        will wait for; another one hands the running job back without waiting."""
        if again:
            self._hurry.set()
        elif not self._announced:
            self._announce()

    def _announce(self) -> None:
        self._announced = True
        if self.current is not None:
            log.info(
                "waiting up to %g s for job %s to finish (Ctrl-C again to hand it back now)",
                self.settings.shutdown_grace_seconds,
                self.current.job_id,
            )

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming; give the running job `grace` seconds to finish (less, if
        `stop_signalled(again=True)` comes), then stop it at its next stage boundary and hand
        its lease back so the next start runs it first."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        claim = self.current
        if claim is not None:
            if not self._announced:
                self._announce()
            waits = [asyncio.ensure_future(e.wait()) for e in (self._job_done, self._hurry)]
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            if self.current is claim:
                self._request_stop("shutdown", "the service is shutting down")
                # The model call may be mid-inference and cannot be interrupted; give the
                # lease back now so the job is not left to wait for lease expiry.
                try:
                    await self.queue.release(claim)
                except DiskFull:
                    log.warning("job %s could not be handed back: the disk is full", claim.job_id)
                else:
                    log.warning(
                        "job %s handed back to the queue unfinished (attempt %s not counted); "
                        "the next start runs it first",
                        claim.job_id,
                        claim.attempt,
                    )
                self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.prefetch.close()
