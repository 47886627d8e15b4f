"""The drain loop: claim a job (or a batch of up to `AIP_BATCH`), decode its image, run the
pipeline on the model thread while heartbeating each lease, then persist each outcome. Knows
the queue and the host, not HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from service import batching, redact
from service.config import Settings
from service.errors import DiskFull, JobFailure
from service.events import EventBus
from service.geo.georef import georeference
from service.intake import open_stored
from service.models.host import ModelHost
from service.nodes import new_node_id
from service.params import JobParams
from service.pipeline import Analysis, BatchItem, ReasonMany, analyse, analyse_many
from service.policy import backoff_seconds, classify, pause_seconds
from service.prefetch import Decoded, Prefetch
from service.store.files import StoredFiles
from service.store.queue import Claim, ClaimNext, Outcome, Queue
from service.store.retention import drop_original

log = logging.getLogger("aip.worker")


class StopJob(Exception):
    """Raised at a stage boundary to abandon the running job (cancel, timeout, shutdown)."""

    def __init__(self, why: str, message: str) -> None:
        super().__init__(message)
        self.why = why
        self.message = message


class _Run:
    """One claimed job in flight: its own stop request, checked at its own stage boundaries."""

    def __init__(self, worker: Worker, claim: Claim, timeout: float) -> None:
        self.worker = worker
        self.claim = claim
        self.began = time.monotonic()
        self.timeout = timeout
        self.deadline = self.began + timeout
        self.reason: tuple[str, str] | None = None
        self.flag = threading.Event()
        self.stage: str | None = None  # its own (a batch's jobs move through stages apart)

    def scale(self, cells: int) -> None:
        """Its detection does `cells` images' worth of work (a tiled frame): its time grows
        to match, as a batch's does."""
        self.deadline = self.began + self.timeout * max(cells, 1)

    def enter(self, stage: str) -> None:
        if stage != self.stage:
            self.worker.events.publish("job.stage", {"stage": stage}, job_id=self.claim.job_id)
        self.stage = stage

    def on_text(self, delta: str) -> None:
        """A piece of the reasoning as it is generated (on the model thread)."""
        self.worker.events.publish("job.text", {"delta": delta}, job_id=self.claim.job_id)

    def request_stop(self, why: str, message: str) -> None:
        self.reason = (why, message)
        self.flag.set()

    def checkpoint(self, stage: str) -> None:
        """Called on the model thread between stages."""
        self.worker.stage = stage
        self.enter(stage)
        if self.flag.is_set() and self.reason is not None:
            why, message = self.reason
            raise StopJob(why, f"{message} (before {stage})")


class Worker:
    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        host: ModelHost,
        events: EventBus | None = None,
        *,
        files: StoredFiles | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.host = host
        self.events = events or EventBus()
        self.id = new_node_id()  # the node's id (service/nodes.py) is its leases' owner
        self.jobs_done = 0  # attempts this worker ran to an end, for GET /v1/nodes
        self.current: Claim | None = None  # the running job (a batch's first)
        self.running: dict[int, _Run] = {}  # every running job, by id
        self.stage: str | None = None  # what the current job is doing, for `aip submit --wait`
        self.batch = 1  # jobs claimed together at most: AIP_BATCH, resolved as the loop starts
        self.batches: list[int] = []  # sizes of the batches run (more than one job), lately
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._job_done = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop signal: hand the job back now
        self._announced = False
        self._disk_strikes = 0  # writes refused by a full disk since the last job was saved
        self._pause_for_disk = False
        self._claim_errors = 0
        self._claim_error_logged = float("-inf")
        self.files = files or StoredFiles.of(settings, queue)
        self.prefetch = Prefetch(self.files.root, queue, self.files)

    @property
    def _stop_flag(self) -> threading.Event:
        """The running job's stop request (a batch's first job), set once it must stop."""
        run = self.running.get(self.current.job_id) if self.current is not None else None
        return run.flag if run is not None else threading.Event()

    def stage_of(self, job_id: int) -> str | None:
        """What a job this worker runs is doing; None when it does not run here."""
        run = self.running.get(job_id)
        return run.stage if run is not None else None

    def _set_stage(self, claim: Claim, stage: str) -> None:
        self.stage = stage
        run = self.running.get(claim.job_id)
        if run is not None:
            run.enter(stage)

    def notify(self) -> None:
        """A job was queued: stop sleeping (busy: decode the next job's image meanwhile)."""
        self._wake.set()
        if self.current is not None:
            self.prefetch.ahead()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="aip-worker")

    async def _resolve_batch(self) -> int:
        setting = self.settings.batch
        if setting != "auto":
            return batching.check(int(setting))
        try:
            on_cpu = await self.host.on_cpu()
        except Exception:  # no model runtime to ask: one job at a time is always sound
            return 1
        return batching.resolve("auto", on_cpu=on_cpu)

    async def run(self) -> None:
        self.batch = await self._resolve_batch()
        following: Claim | None = None  # claimed in the commit that ended the last job
        claim: Claim | None
        while not self._stopping:
            if following is None and self.batch > 1 and not self._pause_for_disk:
                try:
                    claims = await self.queue.claim_many(
                        self.id,
                        self.settings.lease_seconds,
                        self.batch,
                        profiles=self.settings.worker_profiles,
                    )
                except DiskFull:
                    self._disk_full()
                    continue
                except Exception:
                    await self._claim_failed()
                    continue
                self._claim_errors = 0
                if not claims:
                    await self._sleep()
                    continue
                if len(claims) > 1:
                    await self._run_batch(claims)
                    continue
                following = claims[0]
            if following is not None:
                claim, following = following, None
            else:
                if self._pause_for_disk:
                    self._pause_for_disk = False
                    await self._wait_for_space(pause_seconds(self._disk_strikes))
                    continue
                try:
                    claim = await self.queue.claim(
                        self.id,
                        self.settings.lease_seconds,
                        profiles=self.settings.worker_profiles,
                    )
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
                self.running.clear()
                self._job_done.set()
        if following is not None:  # claimed as the stop began: back to its place, not run
            try:
                await self.queue.release(following)
            except DiskFull:
                log.warning("job %s could not be handed back: the disk is full", following.job_id)

    def _claim_next(self) -> ClaimNext | None:
        """What to claim in the commit that ends the running job: nothing once stopping or
        pausing for a full disk, else the next job, saving the separate claim's commit."""
        if self._stopping or self._pause_for_disk or self.batch > 1:
            return None  # a batch worker claims its next jobs together, in one commit
        return ClaimNext(self.id, self.settings.lease_seconds, self.settings.worker_profiles)

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
        wait = await self.queue.seconds_until_runnable()
        if wait is not None:
            timeout = min(timeout, max(wait, 0.0))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.01))

    async def process(self, claim: Claim) -> Claim | None:
        """Run one claimed job to its end; returns the next job, claimed in the same commit
        that recorded this one's end (None: none was ready, or none was wanted)."""
        began = time.perf_counter()
        run = self._start(claim)
        timings = _waited(claim)
        heartbeat = asyncio.create_task(self._heartbeat(run))
        models = self.host.identity()  # until infer() names the models that ran the job
        try:
            image, original_size = await self._decode(claim, timings)
            self.prefetch.ahead()  # the next job's decode overlaps this one's inference
            params = JobParams.from_dict(claim.params)
            analysis = await self.host.infer(
                lambda detector, reasoner: analyse(
                    image,
                    params,
                    detector,
                    reasoner,
                    detect_tokens=self.settings.detect_max_tokens,
                    reason_tokens=self.settings.reason_max_tokens,
                    checkpoint=run.checkpoint,
                    original_size=original_size,
                    frame=self._frame(claim),
                    scale_time=run.scale,
                    on_text=run.on_text,
                ),
                served=models,  # the exact models that ran it, taken in the same step
            )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            return await self._end(claim, exc, timings, models, began)
        finally:
            await _cancelled(heartbeat)
        return await self._end(claim, analysis, timings, models, began)

    async def _run_batch(self, claims: list[Claim]) -> None:
        """Run claimed jobs as one batch: each decoded, then all of them in one model-thread
        call (`analyse_many`), each with its own heartbeat, deadline, cancel and fenced end;
        what stops or fails one job ends that job alone."""
        self._job_done.clear()
        self.current = claims[0]
        try:
            await self._run_claims(claims)
        finally:
            self.current = None
            self.running.clear()
            self._job_done.set()

    async def _run_claims(self, claims: list[Claim]) -> None:
        began = time.perf_counter()
        runs = [self._start(claim, len(claims)) for claim in claims]
        beats = [asyncio.create_task(self._heartbeat(run)) for run in runs]
        timings = {claim.job_id: _waited(claim) for claim in claims}
        models = self.host.identity()
        outcomes: dict[int, Analysis | BaseException] = {}
        try:
            items: list[tuple[Claim, BatchItem]] = []
            for run in runs:
                claim = run.claim
                try:
                    image, size = await self._decode(claim, timings[claim.job_id])
                    params = JobParams.from_dict(claim.params)
                except Exception as exc:
                    outcomes[claim.job_id] = exc
                    continue
                items.append(
                    (
                        claim,
                        BatchItem(
                            image, params, run.checkpoint, size, self._frame(claim), run.scale
                        ),
                    )
                )
            self.prefetch.ahead()
            if items:
                self.batches = [*self.batches[-99:], len(items)]
                try:
                    done = await self.host.infer(
                        lambda detector, reasoner: analyse_many(
                            [item for _, item in items],
                            detector,
                            reasoner,
                            detect_tokens=self.settings.detect_max_tokens,
                            reason_tokens=self.settings.reason_max_tokens,
                            reason_many=_reason_many(),
                        ),
                        served=models,
                    )
                except Exception as exc:  # the host itself (a model not available): every job
                    done = [exc] * len(items)
                outcomes.update(
                    (claim.job_id, out) for (claim, _), out in zip(items, done, strict=True)
                )
        finally:
            for beat in beats:
                await _cancelled(beat)
        for claim in claims:
            try:
                await self._end(claim, outcomes[claim.job_id], timings[claim.job_id], models, began)
            except DiskFull:
                await self._hand_back(claim)
            except Exception:  # the loop must survive anything one job does
                log.exception("job %s: unexpected error while finishing it", claim.job_id)

    def _start(self, claim: Claim, batch: int = 1) -> _Run:
        # A batch's jobs decode and detect one after another, then reason together, so each
        # job's clock allows for the others' work: the batch's jobs share their time.
        run = _Run(self, claim, self.settings.job_timeout_seconds * batch)
        self.running[claim.job_id] = run
        self.events.publish(
            "job.claimed", {"attempt": claim.attempt, "worker": self.id}, job_id=claim.job_id
        )
        return run

    def _frame(self, claim: Claim) -> Callable[[], Image.Image]:
        """The job's image at full size, decoded when tiled detection asks for it."""
        return lambda: open_stored(self.files.root, claim.image_path)

    async def _decode(self, claim: Claim, timings: dict[str, float]) -> Decoded:
        self._set_stage(claim, "decode")
        began = time.perf_counter()
        try:
            decoded = await self.prefetch.take(claim.image_path)
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
        timings["decode"] = (time.perf_counter() - began) * 1000
        return decoded

    async def _end(
        self,
        claim: Claim,
        result: Analysis | BaseException,
        timings: dict[str, float],
        models: dict[str, Any],
        began: float,
    ) -> Claim | None:
        """Record how the attempt ended (fenced: a lost lease writes nothing); returns the job
        claimed in the same commit, if any."""
        if not (isinstance(result, StopJob) and result.why == "shutdown"):
            self.jobs_done += 1
        if isinstance(result, StopJob):
            return await self._stopped(claim, result, timings, models)
        if isinstance(result, BaseException):
            failure = classify(result)
            retry_in = (
                backoff_seconds(claim.round_attempt, base=self.settings.retry_base_seconds)
                if failure.transient
                else None
            )
            status, following = await self._fail(claim, failure, retry_in, timings, models)
            self._failed(claim, status, failure, retry_in)
            log.warning(
                "job %s attempt %s failed (%s: %s) -> %s",
                claim.job_id,
                claim.attempt,
                failure.code,
                failure.message,
                status or "lease lost",
            )
            return following
        params = JobParams.from_dict(claim.params)
        redacted = None
        if params.redact:
            self._set_stage(claim, "redact")
            try:
                await self.files.local(claim.image_path)
                redacted = await asyncio.to_thread(
                    redact.write_copy,
                    self.files.root,
                    claim.image_path,
                    claim.job_id,
                    redact.regions(result.detections, params.redact),
                )
                await self.files.share(redacted)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DiskFull(str(exc)) from exc
                failure = JobFailure(
                    "redaction_failed", f"writing the redacted copy failed: {exc}", transient=True
                )
                retry_in = backoff_seconds(
                    claim.round_attempt, base=self.settings.retry_base_seconds
                )
                status, following = await self._fail(claim, failure, retry_in, timings, models)
                self._failed(claim, status, failure, retry_in)
                return following
        timings.update(result.timings)
        located = time.perf_counter()
        geo, detection_geo = await asyncio.to_thread(
            georeference,
            claim.image_exif,
            *claim.image_size,
            [d.box for d in result.detections],
            params.ground_elevation,
        )
        timings["geo"] = (time.perf_counter() - located) * 1000
        timings["total"] = (time.perf_counter() - began) * 1000 + timings["queue_wait"]
        outcome = Outcome(
            result.detections,
            result.reasoning,
            timings,
            models,
            answer=result.answer,
            citations=result.citations,
            planned_queries=result.planned_queries,
            tiling=result.tiling,
            redacted_path=redacted,
            geo=geo,
            detection_geo=detection_geo,
        )
        self._set_stage(claim, "persist")
        done, following = await self.queue.complete_and_claim(
            claim, outcome, claim_next=self._claim_next()
        )
        if done and redacted is not None and not params.keep_original:
            try:
                await drop_original(
                    self.queue, self.settings.data_dir, claim.job_id, files=self.files
                )
            except Exception:  # kept a while longer: retention or the next job removes it
                log.exception("job %s: removing the unredacted original failed", claim.job_id)
        if done:
            self._disk_strikes = 0
            self.events.publish(
                "job.succeeded",
                {"detections": len(result.detections), "timings_ms": timings},
                job_id=claim.job_id,
            )
            log.info(
                "job %s succeeded: %d detections in %.0f ms",
                claim.job_id,
                len(result.detections),
                timings["total"] - timings["queue_wait"],
            )
        else:
            log.warning("job %s: lease lost before completion; result discarded", claim.job_id)
        return following

    def cancel(self, job_id: int) -> None:
        """Stop a running job at its next stage boundary, if this worker runs it."""
        run = self.running.get(job_id)
        if run is not None:
            run.request_stop("cancelled", "cancelled while running")

    async def _heartbeat(self, run: _Run) -> None:
        claim = run.claim
        interval = max(self.settings.lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(min(interval, max(run.deadline - time.monotonic(), 0.01)))
            if time.monotonic() >= run.deadline:
                run.request_stop(
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
                run.request_stop("lease_lost", "the lease was lost")
                return
            if beat.cancel_requested:
                run.request_stop("cancelled", "cancelled while running")

    async def _fail(
        self,
        claim: Claim,
        failure: JobFailure,
        retry_in: float | None,
        timings: dict[str, float],
        models: dict[str, Any],
    ) -> tuple[str | None, Claim | None]:
        return await self.queue.fail_and_claim(
            claim,
            failure,
            self._claim_next(),
            retry_in=retry_in,
            timings=timings,
            models=models,
        )

    async def _stopped(
        self, claim: Claim, stop: StopJob, timings: dict[str, float], models: dict[str, Any]
    ) -> Claim | None:
        following = None
        if stop.why == "cancelled":
            done, following = await self.queue.cancelled_and_claim(
                claim, stop.message, claim_next=self._claim_next()
            )
            if done:
                self.events.publish("job.cancelled", {}, job_id=claim.job_id)
        elif stop.why == "timeout":
            failure = JobFailure("timeout", stop.message, transient=False)
            status, following = await self._fail(claim, failure, None, timings, models)
            self._failed(claim, status, failure, None)
        elif stop.why == "shutdown":
            await self.queue.release(claim)
        log.info("job %s stopped: %s", claim.job_id, stop.message)
        return following

    def _failed(
        self, claim: Claim, status: str | None, failure: JobFailure, retry_in: float | None
    ) -> None:
        """Say how a failed attempt left its job: failed for good, queued to retry, or
        cancelled (asked while it ran); nothing when the lease was lost."""
        about = {"code": failure.code, "message": failure.message}
        if status == "failed":
            self.events.publish("job.failed", {**about, "retry_in": None}, job_id=claim.job_id)
        elif status == "queued":
            self.events.publish(
                "job.retrying",
                {**about, "retry_in": retry_in, "attempt": claim.attempt},
                job_id=claim.job_id,
            )
        elif status == "cancelled":
            self.events.publish("job.cancelled", {}, job_id=claim.job_id)

    def stop_signalled(self, again: bool) -> None:
        """A stop signal arrived (on the event loop's thread): the first says what shutdown
        will wait for; another one hands the running job back without waiting."""
        if again:
            self._hurry.set()
        elif not self._announced:
            self._announce()

    def _announce(self) -> None:
        self._announced = True
        ids = sorted(self.running) or ([self.current.job_id] if self.current else [])
        if ids:
            jobs = f"job {ids[0]}" if len(ids) == 1 else "jobs " + ", ".join(map(str, ids))
            log.info(
                "waiting up to %g s for %s to finish (Ctrl-C again to hand %s back now)",
                self.settings.shutdown_grace_seconds,
                jobs,
                "it" if len(ids) == 1 else "them",
            )

    async def _give_back(self, claim: Claim) -> None:
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
                # The model call may be mid-inference and cannot be interrupted; give every
                # running job's lease back now so none is left to wait for lease expiry.
                for run in list(self.running.values()):
                    run.request_stop("shutdown", "the service is shutting down")
                    await self._give_back(run.claim)
                self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.prefetch.close()


def _waited(claim: Claim) -> dict[str, float]:
    return {"queue_wait": max(claim.started_at - claim.created_at, 0) * 1000}


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _reason_many() -> ReasonMany:
    """The model runtimes' batched reasoning (imported on the model thread's first batch, so
    this module stays free of mlx)."""
    from service.models.gemma_batch import reason_many

    return reason_many
