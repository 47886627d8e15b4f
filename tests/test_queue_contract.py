"""The job state machine's contract, run on both store backends (a real SQLite file and a real
PostgreSQL server), and the properties several PostgreSQL nodes sharing one queue must keep."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from service.detection import Detection
from service.errors import Conflict, JobFailure
from service.profiles import NO_PROFILE
from service.store import followups as followup_store
from service.store.migrate import migrate
from service.store.postgres.queue import PgQueue
from service.store.queue import Claim, ClaimNext, ImageRecord, Outcome, Queue
from tests.conftest import RunningService, make_image

IMAGE = ImageRecord(
    sha256="ab" * 32, bytes=10, width=100, height=50, format="JPEG", path="images/ab/x.jpg"
)
PARAMS = {"queries": ["car"], "prompt": "what?", "options": {}}
TRANSIENT = JobFailure("model_error", "boom", transient=True)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class Backend:
    """Opens queues on one database of the backend under test: on PostgreSQL each is a node of
    its own (its own connection), on SQLite the file's one writer."""

    def __init__(self, tmp_path: Path, url: str | None) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.name = "sqlite" if url is None else "postgresql"

    async def open(self, clock: Callable[[], float] = time.time) -> Queue:
        if self.url is None:
            db = self.tmp_path / "aip.db"
            await asyncio.to_thread(migrate, db)
            return await Queue.open(db, clock=clock)
        return await PgQueue.connect(self.url, self.tmp_path, clock=clock)


@pytest.fixture
def backend(tmp_path: Path, database_url: str | None) -> Backend:
    return Backend(tmp_path, database_url)


@pytest.fixture
def nodes(tmp_path: Path, pg_url: str) -> Backend:
    """Several nodes on one PostgreSQL database."""
    return Backend(tmp_path, pg_url)


async def rows(queue: Queue, sql: str, *args: object) -> list[tuple[Any, ...]]:
    return await queue.read(lambda db: [tuple(r) for r in db.execute(sql, args).fetchall()])


async def expire_leases(queue: Queue) -> None:
    """Every running lease an hour in the past, in the database's own terms (a float of
    seconds on both backends): how a dead worker's lease looks once its time is up."""
    await queue.write(
        lambda db: db.execute(
            "UPDATE jobs SET lease_until = lease_until - 3600 WHERE status = 'running'"
        )
    )


async def due_now(queue: Queue) -> None:
    """Every queued job's backoff over (run_after moved an hour back)."""
    await queue.write(
        lambda db: db.execute(
            "UPDATE jobs SET run_after = run_after - 3600 WHERE status = 'queued'"
        )
    )


def _image(n: int) -> ImageRecord:
    sha = f"{n:064x}"
    return ImageRecord(sha256=sha, bytes=10, width=8, height=8, format="PNG", path=f"{sha}.png")


@contextlib.asynccontextmanager
async def _writer_busy(queue: Queue) -> AsyncIterator[None]:
    """Keeps the writer thread busy for the block, so the writes started in it are all waiting
    together when it is free again (one group)."""
    gate = threading.Event()
    blocker = asyncio.create_task(queue.read(lambda _conn: gate.wait(10)))
    try:
        yield
        for _ in range(3):  # every task started in the block reaches the writer's queue
            await asyncio.sleep(0)
    finally:
        gate.set()
        await blocker


async def _enqueued_together(queue: Queue, n: int) -> list[tuple[int, bool]]:
    """`n` enqueues waiting for the writer at once (one group): their (id, created)."""
    async with _writer_busy(queue):
        tasks = [
            asyncio.create_task(queue.enqueue(_image(i), PARAMS, input_name=f"{i}.png"))
            for i in range(n)
        ]
    return list(await asyncio.gather(*tasks))


# -- the contract: the same behaviour on both backends ---------------------------------------


def test_claim_takes_oldest_and_each_job_once(backend: Backend) -> None:
    async def scenario() -> bool:
        queue = await backend.open()
        ids = [(await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg"))[0] for _ in range(3)]
        first = await queue.claim("w0", 30)
        assert first is not None and first.job_id == ids[0]
        claims = await asyncio.gather(*(queue.claim(f"w{i}", 30) for i in range(1, 5)))
        await queue.close()
        return sorted([first.job_id] + [c.job_id for c in claims if c is not None]) == ids

    assert run(scenario())


def test_completion_is_fenced_by_owner_and_attempt(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg")
        stale = await queue.claim("old-worker", lease_seconds=10)
        assert stale is not None
        await expire_leases(queue)  # the lease runs out; the job goes back, a new worker takes it
        assert await queue.recover(expired_only=True) == (1, 0)
        fresh = await queue.claim("new-worker", lease_seconds=10)
        assert fresh is not None and fresh.attempt == 2
        box = Detection("car", (1, 2, 3, 4), (100, 50))
        assert not await queue.complete(stale, Outcome([box], "stale"))
        assert (await queue.heartbeat(stale, 10)).owned is False
        assert await queue.fail(stale, TRANSIENT, retry_in=0) is None
        assert not await queue.release(stale)
        assert not await queue.finish_cancelled(stale, "late")
        assert await queue.complete(fresh, Outcome([box, box], "fresh"))
        assert not await queue.complete(fresh, Outcome([], "twice"))  # at most one result
        assert await rows(queue, "SELECT reasoning FROM results") == [("fresh",)]
        assert await rows(queue, "SELECT count(*) FROM detections") == [(2,)]
        outcomes = await rows(queue, "SELECT worker, outcome FROM job_attempts ORDER BY id")
        assert outcomes == [("old-worker", "lost"), ("new-worker", "succeeded")]
        await queue.close()

    run(scenario())


def test_transient_failure_retries_until_attempts_are_used(backend: Backend) -> None:
    async def scenario() -> list[str | None]:
        queue = await backend.open()
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=2)
        statuses = []
        for _ in range(2):
            claim = await queue.claim("w", 30)
            assert claim is not None
            statuses.append(await queue.fail(claim, TRANSIENT, retry_in=600))
            assert await queue.claim("w", 30) is None  # backoff: not runnable yet
            await due_now(queue)
        await queue.close()
        return statuses

    assert run(scenario()) == ["queued", "failed"]


def test_permanent_failure_does_not_retry(backend: Backend) -> None:
    async def scenario() -> str | None:
        queue = await backend.open()
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=3)
        claim = await queue.claim("w", 30)
        assert claim is not None
        bad = JobFailure("corrupt_image", "bad bytes", transient=False)
        status = await queue.fail(claim, bad, retry_in=None)
        assert await queue.claim("w", 30) is None
        await queue.close()
        return status

    assert run(scenario()) == "failed"


def test_expired_leases_are_requeued_or_failed_when_attempts_are_used(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=1)
        await queue.enqueue(IMAGE, PARAMS, input_name="b.jpg", max_attempts=3)
        await queue.claim("dead", 30)
        await queue.claim("dead", 30)
        assert await queue.recover(expired_only=True) == (0, 0)  # live leases are left alone
        await expire_leases(queue)
        assert await queue.recover(expired_only=True) == (1, 1)
        counts = await queue.counts()
        assert counts["queued"] == 1 and counts["failed"] == 1 and counts["running"] == 0
        await queue.close()

    run(scenario())


def test_start_up_recovery_on_sqlite_takes_every_running_job(tmp_path: Path) -> None:
    """The data directory's lock makes this process the file's only user: at start every
    running job is orphaned, live lease or not."""

    async def scenario() -> None:
        queue = await Backend(tmp_path, None).open()
        assert queue.sole_owner
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=1)
        await queue.enqueue(IMAGE, PARAMS, input_name="b.jpg", max_attempts=3)
        await queue.claim("dead", 30)
        await queue.claim("dead", 30)
        assert await queue.recover(expired_only=False) == (1, 1)
        counts = await queue.counts()
        assert counts["queued"] == 1 and counts["failed"] == 1 and counts["running"] == 0
        await queue.close()

    run(scenario())


def test_start_up_recovery_on_postgresql_leaves_live_leases_to_their_nodes(nodes: Backend) -> None:
    """Other nodes are alive: a node starting takes only expired leases, never a live one."""

    async def scenario() -> None:
        other, starting = await nodes.open(), await nodes.open()
        assert not starting.sole_owner
        dead, _ = await other.enqueue(IMAGE, PARAMS, input_name="dead.jpg")
        alive, _ = await other.enqueue(IMAGE, PARAMS, input_name="alive.jpg")
        gone = await other.claim("gone", 30)
        assert gone is not None and gone.job_id == dead
        await expire_leases(other)
        held = await other.claim("alive", 30)
        assert held is not None and held.job_id == alive
        assert await starting.recover(expired_only=False) == (1, 0)
        assert await rows(starting, "SELECT id, status FROM jobs ORDER BY id") == [
            (dead, "queued"),
            (alive, "running"),
        ]
        assert (await other.heartbeat(held, 30)).owned
        await other.close()
        await starting.close()

    run(scenario())


def test_cancel_and_retry_transitions(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        a, _ = await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg")
        b, _ = await queue.enqueue(IMAGE, PARAMS, input_name="b.jpg")
        assert await queue.request_cancel(a) == "cancelled"
        with pytest.raises(Conflict):
            await queue.request_cancel(a)
        claim = await queue.claim("w", 30)
        assert claim is not None and claim.job_id == b
        assert await queue.request_cancel(b) == "running"
        assert (await queue.heartbeat(claim, 30)).cancel_requested
        assert await queue.finish_cancelled(claim, "stopped")
        await queue.retry(a)
        again = await queue.claim("w", 30)
        assert again is not None and again.job_id == a and again.attempt == 1
        with pytest.raises(Conflict):
            await queue.retry(a)  # running, not retryable
        await queue.close()

    run(scenario())


def test_release_gives_the_job_back_without_spending_an_attempt(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg")
        claim = await queue.claim("w", 30)
        assert claim is not None
        assert await queue.release(claim)
        again = await queue.claim("w2", 30)
        # A new number (never reused), first of its round: the budget grew by the one given back.
        assert again is not None and (again.attempt, again.round_attempt) == (2, 1)
        assert await rows(queue, "SELECT max_attempts FROM jobs") == [(4,)]
        await queue.close()

    run(scenario())


def test_idempotency_key_returns_original_or_conflicts(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        first = await queue.enqueue(
            IMAGE, PARAMS, input_name="a", idempotency_key="k", request_hash="h1"
        )
        again = await queue.enqueue(
            IMAGE, PARAMS, input_name="a", idempotency_key="k", request_hash="h1"
        )
        assert first[1] and again == (first[0], False)
        with pytest.raises(Conflict):
            await queue.enqueue(
                IMAGE, PARAMS, input_name="a", idempotency_key="k", request_hash="h2"
            )
        assert (await queue.counts())["queued"] == 1
        await queue.close()

    run(scenario())


def test_a_cancelled_transaction_never_wedges_the_writer(backend: Backend) -> None:
    async def scenario() -> int:
        queue = await backend.open()
        for _ in range(20):  # cancel at every point a task can be cancelled
            task = asyncio.create_task(queue.enqueue(IMAGE, PARAMS, input_name="a.jpg"))
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        job_id, created = await queue.enqueue(IMAGE, PARAMS, input_name="b.jpg")
        assert created and not queue.writer.in_transaction
        await queue.close()
        return job_id

    assert run(scenario()) > 0


def test_a_cancel_requested_while_running_wins_over_a_requeue(backend: Backend) -> None:
    async def scenario() -> list[str | None]:
        queue = await backend.open()
        outcomes: list[str | None] = []
        for path in ("retry", "release", "lost"):
            job_id, _ = await queue.enqueue(IMAGE, PARAMS, input_name=f"{path}.jpg")
            claim = await queue.claim("w", 30)
            assert claim is not None and claim.job_id == job_id
            assert await queue.request_cancel(job_id) == "running"
            if path == "retry":
                outcomes.append(await queue.fail(claim, TRANSIENT, retry_in=0))
            elif path == "release":
                await queue.release(claim)
            else:
                await expire_leases(queue)
                await queue.recover(expired_only=True)
            status = await rows(queue, "SELECT status FROM jobs WHERE id = ?", job_id)
            outcomes.append(status[0][0])
        await queue.close()
        return outcomes

    assert run(scenario()) == ["cancelled"] * 4


def test_a_retry_starts_a_new_round_so_backoff_starts_small_again(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        job, _ = await queue.enqueue(IMAGE, PARAMS, input_name="a.jpg", max_attempts=2)
        rounds = []
        for _ in range(2):
            for _ in range(2):
                claim = await queue.claim("w", 30)
                assert claim is not None and claim.job_id == job
                rounds.append((claim.attempt, claim.round_attempt))
                await queue.fail(claim, TRANSIENT, retry_in=0)
            await queue.retry(job)
        assert rounds == [(1, 1), (2, 2), (3, 1), (4, 2)]
        await queue.close()

    run(scenario())


def test_concurrent_enqueues_in_one_group_all_land_and_survive_a_reopen(backend: Backend) -> None:
    n = 50

    async def scenario() -> None:
        queue = await backend.open()
        results = await _enqueued_together(queue, n)
        await queue.close()
        assert all(created for _, created in results)
        ids = sorted(job_id for job_id, _ in results)
        assert len(set(ids)) == n
        reopened = await backend.open()
        assert [r[0] for r in await rows(reopened, "SELECT id FROM jobs ORDER BY id")] == ids
        assert await rows(reopened, "SELECT count(*) FROM images") == [(n,)]
        await reopened.close()

    run(scenario())


def test_in_a_group_a_conflict_or_an_error_fails_only_its_own_caller(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        original, _ = await queue.enqueue(
            _image(0), PARAMS, input_name="0", idempotency_key="k", request_hash="a"
        )
        async with _writer_busy(queue):
            calls = [
                queue.enqueue(_image(1), PARAMS, input_name="1"),
                # the key's first request, then the same key with other parameters
                queue.enqueue(_image(2), PARAMS, input_name="2", idempotency_key="new",
                              request_hash="a"),
                queue.enqueue(_image(3), PARAMS, input_name="3", idempotency_key="k",
                              request_hash="b"),
                queue.enqueue(_image(4), PARAMS, input_name="4", idempotency_key="new",
                              request_hash="b"),
                # fails after its image row is written: that row must go with it
                queue.enqueue(_image(5), {"unserialisable": object()}, input_name="5"),
                queue.enqueue(_image(6), PARAMS, input_name="6", idempotency_key="k",
                              request_hash="a"),
            ]  # fmt: skip
            tasks = [asyncio.create_task(call) for call in calls]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[0][1] is True and results[1][1] is True  # type: ignore[index]
        assert results[5] == (original, False)
        assert isinstance(results[2], Conflict) and isinstance(results[3], Conflict)
        assert isinstance(results[4], TypeError)
        names = await rows(queue, "SELECT input_name FROM jobs ORDER BY id")
        assert names == [("0",), ("1",), ("2",)]
        assert await rows(queue, "SELECT count(*) FROM images") == [(3,)]
        await queue.close()

    run(scenario())


# -- profiles: a node takes only the jobs of the profiles it serves --------------------------


def test_a_node_limited_to_a_profile_claims_only_its_jobs(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        jobs = {}
        for name, profile in (("x1", "x"), ("plain", None), ("y", "y"), ("x2", "x")):
            params = PARAMS if profile is None else {**PARAMS, "profile": profile}
            jobs[name] = (await queue.enqueue(IMAGE, params, input_name=name))[0]
        await queue.enqueue(IMAGE, {**PARAMS, "profile": None}, input_name="null")
        x = await queue.claim_many("x-node", 30, 10, profiles=("x",))
        assert [c.job_id for c in x] == [jobs["x1"], jobs["x2"]]
        assert await queue.claim("x-node", 30, profiles=("x",)) is None
        assert await queue.claim("z-node", 30, profiles=("z",)) is None
        # NO_PROFILE: the jobs that name none (the key absent, or null).
        plain = await queue.claim_many("plain-node", 30, 10, profiles=(NO_PROFILE, "z"))
        assert [c.params.get("profile") for c in plain] == [None, None]
        # Ending an attempt and claiming the next in one commit filters the same way.
        done, following = await queue.complete_and_claim(
            plain[0], Outcome([], "ok"), ClaimNext("x-node", 30, ("x",))
        )
        assert done and following is None
        done, following = await queue.complete_and_claim(
            plain[1], Outcome([], "ok"), ClaimNext("any-node", 30)
        )
        assert done and following is not None and following.job_id == jobs["y"]
        await queue.close()

    run(scenario())


def test_an_unlimited_node_claims_jobs_of_every_profile(backend: Backend) -> None:
    async def scenario() -> None:
        queue = await backend.open()
        for profile in ("x", None, "y"):
            params = PARAMS if profile is None else {**PARAMS, "profile": profile}
            await queue.enqueue(IMAGE, params, input_name=str(profile))
        claims = await queue.claim_many("any-node", 30, 10)
        assert [c.params.get("profile") for c in claims] == ["x", None, "y"]
        await queue.close()

    run(scenario())


def test_a_service_limited_to_a_profile_runs_only_its_jobs(
    inbox_service: Callable[..., RunningService], database_url: str | None
) -> None:
    """Through the real app and worker (AIP_WORKER_PROFILES): the older job without a profile
    is passed over, the newer one of the node's profile runs."""
    service = inbox_service(database_url=database_url, worker_profiles=("x",))
    assert service.client.put("/v1/profiles/x", json={"params": {"queries": ["car"]}}).is_success
    plain = service.submit(make_image(64, 48)).json()["id"]
    mine = service.submit(make_image(64, 48), profile="x").json()["id"]
    assert service.wait(mine)["status"] == "succeeded"
    assert service.client.get(f"/v1/jobs/{plain}").json()["status"] == "queued"


# -- several PostgreSQL nodes on one queue ---------------------------------------------------


def test_concurrent_nodes_claim_every_job_exactly_once(nodes: Backend) -> None:
    total = 200

    async def drain(queue: Queue, name: str, batch: int) -> list[Claim]:
        taken: list[Claim] = []
        while True:
            if batch > 1:
                got = await queue.claim_many(name, 30, batch)
            else:
                one = await queue.claim(name, 30)
                got = [one] if one is not None else []
            if not got:
                return taken
            taken.extend(got)

    async def scenario() -> None:
        intake = await nodes.open()
        await asyncio.gather(
            *(intake.enqueue(_image(i), PARAMS, input_name=str(i)) for i in range(total))
        )
        workers = [await nodes.open() for _ in range(4)]
        # Each node also claims concurrently with itself (several tasks on one writer).
        taken = await asyncio.gather(
            *(
                drain(queue, f"node{n}-{t}", batch)
                for n, queue in enumerate(workers)
                for t, batch in enumerate((1, 1, 5))
            )
        )
        ids = [c.job_id for claims in taken for c in claims]
        assert len(ids) == len(set(ids)) == total
        assert sum(1 for claims in taken if claims) > 1  # the work was shared
        assert await rows(intake, "SELECT count(*), count(DISTINCT job_id) FROM job_attempts") == [
            (total, total)
        ]
        assert await rows(intake, "SELECT max(attempts) FROM jobs") == [(1,)]
        for queue in (intake, *workers):
            await queue.close()

    run(scenario())


def test_a_node_with_a_skewed_clock_neither_steals_nor_keeps_a_lease(nodes: Backend) -> None:
    """Every lease decision is the database's clock: a node an hour ahead does not see a live
    lease as expired, and a node an hour behind does not see a dead one as live."""

    async def scenario() -> None:
        ahead = await nodes.open(clock=lambda: time.time() + 3600)
        behind = await nodes.open(clock=lambda: time.time() - 3600)
        live, _ = await ahead.enqueue(IMAGE, PARAMS, input_name="live.jpg")
        dead, _ = await ahead.enqueue(IMAGE, PARAMS, input_name="dead.jpg")
        # Held by the node behind: by its own clock this lease ended an hour ago.
        held = await behind.claim("behind", 30)
        assert held is not None and held.job_id == live
        assert await ahead.recover(expired_only=True) == (0, 0)
        assert await ahead.recover(expired_only=False) == (0, 0)
        assert (await behind.heartbeat(held, 30)).owned
        # Held by the node ahead for half a second: by its own clock, for an hour more.
        short = await ahead.claim("ahead", 0.5)
        assert short is not None and short.job_id == dead
        await asyncio.sleep(1.0)
        assert await behind.recover(expired_only=True) == (1, 0)
        assert not (await ahead.heartbeat(short, 30)).owned
        assert await rows(ahead, "SELECT id, status FROM jobs ORDER BY id") == [
            (live, "running"),
            (dead, "queued"),
        ]
        await ahead.close()
        await behind.close()

    run(scenario())


def test_nodes_recovering_the_same_expired_leases_together_requeue_each_once(
    nodes: Backend,
) -> None:
    jobs = 20

    async def scenario() -> None:
        crashed = await nodes.open()
        for i in range(jobs):
            await crashed.enqueue(_image(i), PARAMS, input_name=str(i))
        assert len(await crashed.claim_many("crashed", 30, jobs)) == jobs
        await expire_leases(crashed)
        await crashed.close()
        rescuers = [await nodes.open() for _ in range(3)]
        results = await asyncio.gather(*(q.recover(expired_only=True) for q in rescuers))
        assert sum(requeued for requeued, _ in results) == jobs
        assert all(failed == 0 for _, failed in results)
        lost = await rows(rescuers[0], "SELECT outcome, count(*) FROM job_attempts GROUP BY 1")
        assert lost == [("lost", jobs)]
        assert (await rescuers[0].counts())["queued"] == jobs
        for queue in rescuers:
            await queue.close()

    run(scenario())


def test_a_completion_racing_another_nodes_recovery_lands_whole_or_not_at_all(
    nodes: Backend,
) -> None:
    """The fence's check and the write that relies on it hold the row between them: a result
    either lands on a job it owned, or the job was requeued and no result exists."""
    jobs = 30

    async def scenario() -> None:
        worker, rescuer = await nodes.open(), await nodes.open()
        for i in range(jobs):
            await worker.enqueue(_image(i), PARAMS, input_name=str(i))
        claims = await worker.claim_many("worker", 30, jobs)
        await expire_leases(worker)
        recovery = asyncio.create_task(rescuer.recover(expired_only=True))
        done = await asyncio.gather(*(worker.complete(c, Outcome([], "done")) for c in claims))
        requeued, completed = (await recovery)[0], sum(done)
        assert requeued + completed == jobs
        state = await rows(
            rescuer,
            "SELECT j.status, a.outcome, count(r.job_id) FROM jobs j"
            " JOIN job_attempts a ON a.job_id = j.id LEFT JOIN results r ON r.job_id = j.id"
            " GROUP BY j.id, j.status, a.outcome",
        )
        assert {(s, o, n) for s, o, n in state} <= {
            ("succeeded", "succeeded", 1),
            ("queued", "lost", 0),
        }
        for queue in (worker, rescuer):
            await queue.close()

    run(scenario())


def test_nodes_enqueueing_the_same_idempotency_keys_together_make_one_job_each(
    nodes: Backend,
) -> None:
    keys = 20

    async def scenario() -> None:
        first, second = await nodes.open(), await nodes.open()
        results = await asyncio.gather(
            *(
                queue.enqueue(_image(i), PARAMS, input_name=str(i), idempotency_key=f"k{i}",
                              request_hash="h")
                for i in range(keys)
                for queue in (first, second)
            )
        )  # fmt: skip
        by_key: dict[int, set[int]] = {}
        for n, (job_id, _) in enumerate(results):
            by_key.setdefault(n // 2, set()).add(job_id)
        assert all(len(ids) == 1 for ids in by_key.values())
        assert sum(created for _, created in results) == keys
        assert (await first.counts())["queued"] == keys
        for queue in (first, second):
            await queue.close()

    run(scenario())


def test_a_node_whose_connection_was_cut_connects_again(nodes: Backend) -> None:
    """A server restart or a dropped link: the statement that meets the dead connection fails,
    the next write and read connect again and work."""

    async def scenario() -> tuple[int, int]:
        queue = await nodes.open()
        try:
            first, _ = await queue.enqueue(_image(1), PARAMS, input_name="a.png")
            ((pid,),) = await rows(queue, "SELECT pg_backend_pid()")
            admin = await nodes.open()
            await admin.read(lambda db: db.execute("SELECT pg_terminate_backend(?)", (pid,)))
            await admin.close()
            with contextlib.suppress(Exception):  # psycopg learns of the cut here
                await queue.counts()
            assert (await queue.counts())["queued"] == 1  # a read outside any transaction
            second, _ = await queue.enqueue(_image(2), PARAMS, input_name="b.png")
            assert (await queue.counts())["queued"] == 2
            return first, second
        finally:
            await queue.close()

    first, second = run(scenario())
    assert second == first + 1


def test_a_lost_nodes_follow_up_is_answered_by_another_and_its_late_answer_dropped(
    nodes: Backend,
) -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        lost, alive = await nodes.open(), await nodes.open()
        try:
            job_id, _ = await lost.enqueue(_image(1), PARAMS, input_name="a.png")
            claim = await lost.claim("w", 30)
            assert claim is not None
            assert await lost.complete(claim, Outcome(detections=[], reasoning="a car"))
            await followup_store.ask(lost, job_id, "which way?", 8)
            taken = await followup_store.claim(lost, "lost-node", 60)
            assert taken is not None
            assert await followup_store.recover(alive, expired_only=True) == 0  # a live lease
            await alive.write(
                lambda db: db.execute("UPDATE followups SET lease_until = lease_until - 3600")
            )
            assert await followup_store.recover(alive, expired_only=True) == 1
            again = await followup_store.claim(alive, "alive-node", 60)
            assert again is not None and again.key == taken.key
            assert not await followup_store.finish(lost, taken, "lost-node", "late", {})
            assert await followup_store.finish(alive, again, "alive-node", "left", {})
            return await rows(alive, "SELECT status, answer, lease_owner FROM followups")
        finally:
            await lost.close()
            await alive.close()

    assert run(scenario()) == [("succeeded", "left", None)]
