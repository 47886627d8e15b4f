"""Ending an attempt and claiming the next job in one commit: what lands, what is fenced, what a
kill between leaves, and the real worker using it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.errors import JobFailure
from service.store.migrate import migrate
from service.store.queue import ClaimNext, ImageRecord, Outcome, Queue
from tests.conftest import RunningService, db_rows, gate_detector

PARAMS = {"queries": ["car"], "prompt": "what?", "options": {}}
NEXT = ClaimNext("w", 30.0)
Serve = Callable[..., RunningService]


def _image(i: int) -> ImageRecord:
    sha = f"{i:064x}"
    return ImageRecord(sha, 10, 8, 8, "PNG", f"images/{sha}.png")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 0.001  # every reading later than the last: queue order is unambiguous
        return self.now


async def _queue(db: Path, clock: Clock | None = None, jobs: int = 2) -> Queue:
    migrate(db)
    queue = await Queue.open(db, clock=clock or Clock())
    for i in range(jobs):
        await queue.enqueue(_image(i), PARAMS, input_name=f"{i}.png")
    return queue


async def _commits(queue: Queue) -> list[list[str]]:
    """From now on, the statements of each transaction the writer commits, in order."""
    transactions: list[list[str]] = [[]]

    def trace(sql: str) -> None:
        transactions[-1].append(sql)
        if sql == "COMMIT":
            transactions.append([])

    await queue.read(lambda conn: conn.set_trace_callback(trace))
    return transactions


def test_completion_claims_the_next_job_in_the_same_commit(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"

    async def scenario() -> int:
        queue = await _queue(db)
        first = await queue.claim("w", 30)
        assert first is not None and first.job_id == 1
        transactions = await _commits(queue)
        done, following = await queue.complete_and_claim(first, Outcome([], "one"), claim_next=NEXT)
        assert done and following is not None
        assert (following.job_id, following.attempt, following.owner) == (2, 1, "w")
        commits = len(transactions) - 1
        done, last = await queue.complete_and_claim(following, Outcome([], "two"), claim_next=NEXT)
        assert done and last is None  # nothing left to claim
        await queue.close()
        return commits

    assert asyncio.run(scenario()) == 1
    assert db_rows(db, "SELECT id, status FROM jobs ORDER BY id") == [
        (1, "succeeded"),
        (2, "succeeded"),
    ]
    assert db_rows(db, "SELECT job_id, attempt, worker, outcome FROM job_attempts ORDER BY id") == [
        (1, 1, "w", "succeeded"),
        (2, 1, "w", "succeeded"),
    ]


def test_a_fenced_off_completion_still_claims_the_next_job(tmp_path: Path) -> None:
    """Decided: the worker is free whether or not its result was kept, so it claims next."""
    clock = Clock()
    db = tmp_path / "aip.db"

    async def scenario() -> None:
        queue = await _queue(db, clock)
        stale = await queue.claim("old", lease_seconds=10)
        assert stale is not None
        clock.now += 11  # the lease runs out; the job goes back and another worker takes it
        assert await queue.recover(expired_only=True) == (1, 0)
        fresh = await queue.claim("new", lease_seconds=10)
        assert fresh is not None and fresh.job_id == stale.job_id
        done, following = await queue.complete_and_claim(
            stale, Outcome([], "stale"), claim_next=ClaimNext("old", 10)
        )
        assert not done and following is not None and following.job_id == 2
        assert (await queue.heartbeat(following, 10)).owned
        assert await queue.complete(fresh, Outcome([], "fresh"))
        await queue.close()

    asyncio.run(scenario())
    assert db_rows(db, "SELECT job_id, reasoning FROM results") == [(1, "fresh")]
    assert db_rows(db, "SELECT status, lease_owner FROM jobs WHERE id = 2") == [("running", "old")]


def test_failure_and_cancellation_claim_the_next_job_too(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"

    async def scenario() -> None:
        queue = await _queue(db, jobs=3)
        first = await queue.claim("w", 30)
        assert first is not None
        bad = JobFailure("corrupt_image", "bad bytes", transient=False)
        status, second = await queue.fail_and_claim(first, bad, retry_in=None, claim_next=NEXT)
        assert status == "failed" and second is not None and second.job_id == 2
        assert await queue.request_cancel(2) == "running"
        done, third = await queue.cancelled_and_claim(second, "stopped", claim_next=NEXT)
        assert done and third is not None and third.job_id == 3
        # None: end the attempt, claim nothing (a stopping worker).
        status, nothing = await queue.fail_and_claim(third, bad, retry_in=None, claim_next=None)
        assert status == "failed" and nothing is None
        await queue.close()

    asyncio.run(scenario())
    assert db_rows(db, "SELECT id, status FROM jobs ORDER BY id") == [
        (1, "failed"),
        (2, "cancelled"),
        (3, "failed"),
    ]


def test_a_transient_failure_with_attempts_left_is_not_reclaimed_before_its_backoff(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[str | None, int | None]:
        queue = await _queue(tmp_path / "aip.db", jobs=1)
        claim = await queue.claim("w", 30)
        assert claim is not None
        boom = JobFailure("model_error", "boom", transient=True)
        status, following = await queue.fail_and_claim(claim, boom, retry_in=5, claim_next=NEXT)
        await queue.close()
        return status, None if following is None else following.job_id

    assert asyncio.run(scenario()) == ("queued", None)


def test_the_worker_commit_shares_a_group_with_waiting_enqueues(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"

    async def scenario() -> list[list[str]]:
        queue = await _queue(db)
        claim = await queue.claim("w", 30)
        assert claim is not None
        transactions = await _commits(queue)
        gate = threading.Event()
        # The writer is busy: what follows waits together (as during another commit's fsync).
        blocker = asyncio.create_task(queue.read(lambda _conn: gate.wait(10)))
        before = asyncio.create_task(queue.enqueue(_image(9), PARAMS, input_name="9.png"))
        ending = asyncio.create_task(
            queue.complete_and_claim(claim, Outcome([], "one"), claim_next=NEXT)
        )
        after = asyncio.create_task(queue.enqueue(_image(8), PARAMS, input_name="8.png"))
        for _ in range(3):
            await asyncio.sleep(0)
        gate.set()
        await blocker
        done, following = await ending
        assert done and following is not None and following.job_id == 2
        assert [(await before)[0], (await after)[0]] == [3, 4]
        await queue.close()
        return [t for t in transactions if t]

    transactions = asyncio.run(scenario())
    assert len(transactions) == 1  # three callers, one COMMIT
    assert db_rows(db, "SELECT id, status FROM jobs ORDER BY id") == [
        (1, "succeeded"),
        (2, "running"),
        (3, "queued"),
        (4, "queued"),
    ]


# -- a kill -9 inside the combined transaction ---------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from service.store.migrate import migrate
    from service.store.queue import ClaimNext, ImageRecord, Outcome, Queue

    db, marker = Path(sys.argv[1]), sys.argv[2]

    def die_at(sql):
        if marker != "after" and sql.startswith(marker):
            os.kill(os.getpid(), signal.SIGKILL)

    async def main():
        migrate(db)
        queue = await Queue.open(db)
        for i in range(2):
            sha = f"{i:064x}"
            image = ImageRecord(sha, 10, 8, 8, "PNG", f"images/{sha}.png")
            await queue.enqueue(image, {}, input_name=f"{i}.png")
        claim = await queue.claim("w", 30)
        await queue.read(lambda conn: conn.set_trace_callback(die_at))
        await queue.complete_and_claim(claim, Outcome([], "done"), claim_next=ClaimNext("w", 30))
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)

NEITHER = {
    "jobs": [(1, "running", 1), (2, "queued", 0)],
    "attempts": [(1, 1, None)],
    "results": [],
}
BOTH = {
    "jobs": [(1, "succeeded", 1), (2, "running", 1)],
    "attempts": [(1, 1, "succeeded"), (2, 1, None)],
    "results": [(1,)],
}


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ("INSERT INTO results", NEITHER),  # the completion's first write
        ("UPDATE jobs SET status = 'running'", NEITHER),  # completion written, claim not yet
        ("INSERT INTO job_attempts", NEITHER),  # the claim's last statement
        ("COMMIT", NEITHER),  # everything written, not committed
        ("after", BOTH),  # killed once the call returned
    ],
)
def test_a_kill_inside_complete_and_claim_leaves_both_or_neither(
    tmp_path: Path, marker: str, expected: dict[str, list[tuple[object, ...]]]
) -> None:
    db = tmp_path / "aip.db"
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(db), marker], capture_output=True, timeout=60
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    found = {
        "jobs": db_rows(db, "SELECT id, status, attempts FROM jobs ORDER BY id"),
        "attempts": db_rows(db, "SELECT job_id, attempt, outcome FROM job_attempts ORDER BY id"),
        "results": db_rows(db, "SELECT job_id FROM results"),
    }
    assert found == expected


# -- the real worker --------------------------------------------------------------------------


def test_the_worker_claims_each_next_job_in_the_commit_that_ends_the_last(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.replace(batch=1)  # one job at a time: the next is claimed on the end
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    first = service.submit(queries="car").json()["id"]
    assert gate.inside.wait(timeout=60)
    queue, worker = service.services.queue, service.services.worker
    loop = worker._task.get_loop()
    transactions = asyncio.run_coroutine_threadsafe(_commits(queue), loop).result(10)
    rest = [service.submit(queries="car").json()["id"] for _ in range(2)]
    gate.release.set()
    for job_id in (first, *rest):
        assert service.wait(job_id)["status"] == "succeeded"
    service.stop()
    ends = [t for t in transactions if any("SET status = 'succeeded'" in s for s in t)]
    assert len(ends) == 3
    # The first two ends claimed the next job; the last found none (its claim matched nothing).
    assert all(any("SET status = 'running'" in s for s in t) for t in ends)


def test_a_job_claimed_as_the_worker_stops_goes_back_unrun(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.replace(batch=1)  # one job at a time: the next is claimed on the end
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    first = service.submit(queries="car").json()["id"]
    assert gate.inside.wait(timeout=60)
    second = service.submit(queries="car").json()["id"]
    queue, worker = service.services.queue, service.services.worker
    real_complete = queue.complete_and_claim

    async def complete_then_stop(*args: Any, **kwargs: Any) -> Any:
        ended = await real_complete(*args, **kwargs)  # claims `second` in the same commit
        stopping = asyncio.create_task(worker.stop(grace=30))
        await asyncio.sleep(0)  # the stop has begun before the worker sees what it claimed
        assert not stopping.done()
        return ended

    monkeypatch.setattr(queue, "complete_and_claim", complete_then_stop)
    gate.release.set()
    assert service.wait(first)["status"] == "succeeded"
    job = service.wait(second, statuses=("queued",))
    assert [(a["attempt"], a["outcome"]) for a in job["attempt_history"]] == [(1, "released")]
    assert job["attempts"] == 1 and job["max_attempts"] == settings.max_attempts + 1
