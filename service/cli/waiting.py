"""Waiting for jobs to end: follows the service's event stream (polling where there is none),
shows queue position, then stage and the reasoning as it streams, on one updating line, and on
Ctrl-C says which jobs go on and how to keep waiting."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from service.cli import INTERRUPTED
from service.cli.output import Progress
from service.cli.stream import EventStream, StreamEnded
from service.client import Client, ClientError

TERMINAL = ("succeeded", "failed", "cancelled")
# Events after which the job is read again: how it ended, or its new place in the queue.
_REREAD = ("job.succeeded", "job.failed", "job.cancelled", "job.retrying")
# Another job's events that move the queue along.
_QUEUE_MOVES = ("job.claimed", "job.cancelled")


def progress_text(jobs: Sequence[dict[str, Any]]) -> str:
    """What the waiting jobs are doing, in one short line."""
    if len(jobs) == 1:
        return f"job {jobs[0]['id']}: {_state(jobs[0])}"
    done = sum(j["status"] in TERMINAL for j in jobs)
    text = f"{done} of {len(jobs)} done"
    running = [j for j in jobs if j["status"] == "running"]
    if running:
        text += f"; job {running[0]['id']} {_state(running[0])}"
    queued = [j for j in jobs if j["status"] == "queued"]
    if queued:
        first = min((j.get("queue_position") or 0 for j in queued), default=0)
        text += f"; {len(queued)} queued" + (f", next at position {first}" if first else "")
    return text


def _state(job: dict[str, Any]) -> str:
    if job["status"] == "queued":
        position = job.get("queue_position")
        return f"queued, position {position} in the queue" if position else "queued"
    if job["status"] == "running":
        stage = str(job.get("stage") or "")
        if stage.startswith("detect:"):  # the pipeline names the query it is looking for
            stage = f"detect {stage.removeprefix('detect:')!r}"
        text = " ".join(str(job.get("reasoning_so_far") or "").split())
        if stage == "reason" and text:  # the tail of the reasoning streamed so far
            stage += f": ...{text[-40:]}" if len(text) > 40 else f": {text}"
        return f"running: {stage}" if stage else "running"
    return str(job["status"])


def interrupted(ids: Sequence[int], jobs: dict[int, dict[str, Any]] | None = None) -> ClientError:
    """The Ctrl-C message: the jobs go on in the service; how to find them again."""
    pending = [i for i in ids if jobs is None or jobs.get(i, {}).get("status") not in TERMINAL]
    pending = pending or list(ids)
    numbers = " ".join(str(i) for i in pending)
    listed = ", ".join(str(i) for i in pending)
    which = f"job {listed} goes" if len(pending) == 1 else f"jobs {listed} go"
    return ClientError(
        f"stopped waiting; {which} on in the service: `aip wait {numbers}` waits again, "
        f"`aip show {pending[0]}` shows {'it' if len(pending) == 1 else 'one'}",
        exit_code=INTERRUPTED,
    )


def wait_for(
    client: Client, ids: Sequence[int], *, timeout: float | None = None
) -> list[dict[str, Any]]:
    """Every job in `ids` once it has ended, in the same order."""
    progress = Progress()
    jobs: dict[int, dict[str, Any]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    # Opened before the jobs are first read: whatever happens after that read is heard.
    events = EventStream.open(client)
    stale = set(ids)  # jobs to read again before the line is drawn
    try:
        while True:
            for job_id in ids:
                if job_id in stale and jobs.get(job_id, {}).get("status") not in TERMINAL:
                    jobs[job_id] = client.call("GET", f"/v1/jobs/{job_id}")
            ordered = [jobs[i] for i in ids]
            if all(j["status"] in TERMINAL for j in ordered):
                return ordered
            progress.show(progress_text(ordered))
            if deadline is not None and time.monotonic() >= deadline:
                progress.clear()
                raise ClientError(
                    f"{progress_text(ordered)} after {timeout:g} s (--timeout); "
                    f"`aip wait {' '.join(map(str, ids))}` waits again"
                )
            left = 3600.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            if events is not None:
                try:
                    stale = _follow(events, jobs, min(left, 10.0))
                    continue
                except StreamEnded:
                    events = None  # gone (the service restarted?): poll from here on
            stale = set(ids)
            # Many jobs: ask less often, so a long wait does not load the service.
            time.sleep(min(0.25 + 0.02 * len(ids), 5.0, left))
    except KeyboardInterrupt:
        progress.clear()
        raise interrupted(ids, jobs) from None
    finally:
        progress.clear()
        if events is not None:
            events.close()


def _follow(events: EventStream, jobs: dict[int, dict[str, Any]], wait: float) -> set[int]:
    """Apply the events that come within `wait` seconds (and those right behind, for a
    quarter second at most) to `jobs`; returns the jobs to read again. Silence for `wait`
    reads them all again: a backstop of one request per job every few seconds."""
    event = events.next(wait)
    if event is None:
        return set(jobs)
    stale: set[int] = set()
    until = time.monotonic() + 0.25
    while event is not None:
        job_id = event.get("job_id")
        job = jobs.get(job_id) if isinstance(job_id, int) else None
        kind = event["type"]
        if job is None:
            if kind in _QUEUE_MOVES:
                stale |= {i for i, j in jobs.items() if j["status"] == "queued"}
        elif kind in _REREAD:
            stale.add(job["id"])
        elif kind == "job.claimed":
            job.update(status="running", stage=None, queue_position=None, reasoning_so_far="")
        elif kind == "job.stage":
            job.update(status="running", stage=event["data"].get("stage"))
        elif kind == "job.text":
            job["reasoning_so_far"] = job.get("reasoning_so_far", "") + event["data"]["delta"]
        event = events.next(0.05) if time.monotonic() < until else None
    return stale
