"""PostgreSQL benchmark (issue 15): null-pipeline jobs/s with 1, 2 and 4 worker processes, each
its own `PgQueue` driven as the worker drives it, against a raw psycopg `SKIP LOCKED` loop of
the same statements in as many processes on the same server; one node on SQLite; the raw loop
on psycopg 3 against asyncpg (the driver choice); and the real pipeline's burst on `small`
with 1 vs 2 `aip worker` processes, each with its own models.

    .venv/bin/python -m bench.postgres_bench [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg

from bench import pg_server
from bench.table import Row, compare, interleaved, main_for, median
from service.store.migrate import migrate
from service.store.postgres.connection import placeholders
from service.store.postgres.queue import PgQueue
from service.store.queue import ClaimNext, Outcome, Queue

WORKERS = (1, 2, 4)
LEASE = 60.0
PARAMS = json.dumps({"queries": ["car"], "prompt": "Describe.", "options": {}})

# -- jobs enqueued up front (not timed), the same rows for every candidate ---------------------

_IMAGE = (
    "INSERT INTO images (sha256, bytes, width, height, format, path, exif, created_at,"
    " captured_at) VALUES (?, 1000, 64, 48, 'JPEG', ?, NULL, ?, NULL)"
)
_JOB = (
    "INSERT INTO jobs (source, image_sha256, input_name, params, max_attempts, run_after,"
    " created_at) VALUES ('api', ?, ?, ?, 3, ?, ?)"
)


def _enqueue(target: str, jobs: int, salt: str) -> None:
    """`jobs` queued jobs in one transaction, into a PostgreSQL URL or an SQLite file."""
    now = time.time() - 1  # runnable at once by the database's clock too (same machine)
    shas = [hashlib.sha256(f"{salt}-{i}".encode()).hexdigest() for i in range(jobs)]
    images = [(sha, f"images/{sha[:2]}/{sha}.jpg", now) for sha in shas]
    rows = [(sha, f"{i}.jpg", PARAMS, now, now) for i, sha in enumerate(shas)]
    if target.startswith("postgresql://"):
        with psycopg.connect(target) as conn, conn.cursor() as cursor:
            cursor.executemany(placeholders(_IMAGE), images)
            cursor.executemany(placeholders(_JOB), rows)
        return
    with contextlib.closing(sqlite3.connect(target)) as db, db:
        db.executemany(_IMAGE, images)
        db.executemany(_JOB, rows)


# -- ours: the real queues, as service/worker.py drives them ------------------------------------


async def _ours(queue: Queue, owner: str) -> tuple[float, float, int]:
    """Claim, then each completion claims the next job in the same commit, until empty."""
    began = time.monotonic()
    claim = await queue.claim(owner, LEASE)
    done = 0
    while claim is not None:
        ok, claim = await queue.complete_and_claim(
            claim, Outcome(detections=[], reasoning="ok"), ClaimNext(owner, LEASE)
        )
        done += ok
    return began, time.monotonic(), done


# -- baseline: the same statements on a raw driver, database clock inline, prepared -------------

_NOW = "extract(epoch FROM clock_timestamp())::float8"
RAW = {
    "claim": "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = %s,"
    f" lease_until = {_NOW} + 60, started_at = coalesce(started_at, {_NOW})"
    " WHERE id = (SELECT id FROM jobs WHERE status = 'queued'"
    f" AND run_after <= {_NOW} ORDER BY run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING id, attempts, image_sha256, params, coalesce(queued_at, created_at),"
    " started_at, attempts - max_attempts + coalesce(attempt_budget, max_attempts)",
    "image": "SELECT path FROM images WHERE sha256 = %s",
    "attempt": "INSERT INTO job_attempts (job_id, attempt, worker, started_at)"
    f" VALUES (%s, %s, %s, {_NOW})",
    "owns": "SELECT 1 FROM jobs WHERE id = %s AND status = 'running' AND lease_owner = %s"
    " AND attempts = %s",
    "result": "INSERT INTO results (job_id, reasoning, created_at, answer, citations,"
    f" planned_queries, tiling, redacted_path) VALUES (%s, 'ok', {_NOW}, NULL, '[]', NULL,"
    " NULL, NULL)",
    "end_attempt": f"UPDATE job_attempts SET finished_at = {_NOW}, outcome = 'succeeded',"
    " error_code = NULL, error_message = NULL WHERE job_id = %s AND attempt = %s"
    " AND worker = %s AND finished_at IS NULL",
    "end_job": f"UPDATE jobs SET status = 'succeeded', finished_at = {_NOW},"
    " lease_owner = NULL, lease_until = NULL, error_code = NULL, error_message = NULL,"
    " timings = %s, models = '{}' WHERE id = %s",
}
_TIMINGS = json.dumps({"persist": 0.1})


def _numbered(sql: str) -> str:
    """psycopg's `%s` placeholders as asyncpg's `$1, $2, ...`."""
    parts = sql.split("%s")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1))


def _pg_claim(conn: psycopg.Connection[Any], owner: str) -> tuple[int, int] | None:
    row = conn.execute(RAW["claim"], (owner,), prepare=True).fetchone()
    if row is None:
        return None
    job_id, attempt, sha, params = row[:4]
    json.loads(params)
    conn.execute(RAW["image"], (sha,), prepare=True).fetchone()
    conn.execute(RAW["attempt"], (job_id, attempt, owner), prepare=True)
    return job_id, attempt


def _pg_complete(conn: psycopg.Connection[Any], owner: str, job_id: int, attempt: int) -> None:
    assert conn.execute(RAW["owns"], (job_id, owner, attempt), prepare=True).fetchone()
    conn.execute(RAW["result"], (job_id,), prepare=True)
    conn.execute(RAW["end_attempt"], (job_id, attempt, owner), prepare=True)
    conn.execute(RAW["end_job"], (_TIMINGS, job_id), prepare=True)


async def _psycopg(conn: psycopg.Connection[Any], owner: str) -> tuple[float, float, int]:
    """Autocommit off: each job's end and the next claim are one transaction."""
    began = time.monotonic()
    claim = _pg_claim(conn, owner)
    conn.commit()
    done = 0
    while claim is not None:
        _pg_complete(conn, owner, *claim)
        claim = _pg_claim(conn, owner)
        conn.commit()
        done += 1
    return began, time.monotonic(), done


async def _asyncpg_claim(stmts: dict[str, Any], owner: str) -> tuple[int, int] | None:
    row = await stmts["claim"].fetchrow(owner)
    if row is None:
        return None
    job_id, attempt, sha, params = row[0], row[1], row[2], row[3]
    json.loads(params)
    await stmts["image"].fetchrow(sha)
    await stmts["attempt"].fetch(job_id, attempt, owner)
    return job_id, attempt


async def _asyncpg(handle: tuple[Any, dict[str, Any]], owner: str) -> tuple[float, float, int]:
    conn, stmts = handle
    began = time.monotonic()
    async with conn.transaction():
        claim = await _asyncpg_claim(stmts, owner)
    done = 0
    while claim is not None:
        job_id, attempt = claim
        async with conn.transaction():
            assert await stmts["owns"].fetchrow(job_id, owner, attempt)
            await stmts["result"].fetch(job_id)
            await stmts["end_attempt"].fetch(job_id, attempt, owner)
            await stmts["end_job"].fetch(_TIMINGS, job_id)
            claim = await _asyncpg_claim(stmts, owner)
        done += 1
    return began, time.monotonic(), done


# -- worker processes, started once, each running one candidate's loop per round ----------------


async def _open(kind: str, target: str, data_dir: Path) -> Any:
    if kind == "ours":
        return await PgQueue.connect(target, data_dir)
    if kind == "sqlite":
        return await Queue.open(Path(target))
    if kind == "psycopg":
        return psycopg.connect(target)
    import asyncpg

    conn = await asyncpg.connect(target)
    return conn, {name: await conn.prepare(_numbered(sql)) for name, sql in RAW.items()}


async def _close(kind: str, handle: Any) -> None:
    if kind in ("ours", "sqlite"):
        await handle.close()
    elif kind == "psycopg":
        handle.close()
    else:
        await handle[0].close()


LOOPS: dict[str, Callable[[Any, str], Any]] = {
    "ours": _ours,
    "sqlite": _ours,
    "psycopg": _psycopg,
    "asyncpg": _asyncpg,
}


def _serve(pipe: Connection) -> None:
    """A pool process: (kind, target, data dir, owner) opens (once) the candidate's
    connection and answers "ready"; "go" runs its loop, answered with (began, ended, jobs)."""
    loop = asyncio.new_event_loop()
    opened: dict[tuple[str, str], Any] = {}
    try:
        while (message := pipe.recv()) is not None:
            kind, target, data_dir, owner = message
            try:
                if (kind, target) not in opened:
                    opened[kind, target] = loop.run_until_complete(
                        _open(kind, target, Path(data_dir))
                    )
                pipe.send("ready")
                if pipe.recv() is None:  # the round was called off (another process failed)
                    break
                pipe.send(loop.run_until_complete(LOOPS[kind](opened[kind, target], owner)))
            except Exception:
                pipe.send(("error", traceback.format_exc()))
    finally:
        for (kind, _), handle in opened.items():
            loop.run_until_complete(_close(kind, handle))
        loop.close()


class Pool:
    """Spawned worker processes (nothing inherited), kept across rounds so that start-up and
    connecting are not timed; a round uses the first `workers` of them."""

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for _ in range(size):
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child,), daemon=True)
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)

    def drain(self, kind: str, target: str, data_dir: Path, workers: int) -> tuple[int, float]:
        """Every worker connected, then all told to go: (jobs done, seconds from the first
        claim to the last completion across the processes)."""
        pipes = self.pipes[:workers]
        for i, pipe in enumerate(pipes):
            pipe.send((kind, target, str(data_dir), f"bench-{os.getpid()}-{i}"))
        for pipe in pipes:
            _answer(pipe.recv())
        for pipe in pipes:
            pipe.send("go")
        spans = [_answer(pipe.recv()) for pipe in pipes]
        began, ended = min(s[0] for s in spans), max(s[1] for s in spans)
        return sum(s[2] for s in spans), ended - began

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


def _answer(message: Any) -> Any:
    if isinstance(message, tuple) and message[:1] == ("error",):
        raise RuntimeError(f"a benchmark worker process failed:\n{message[1]}")
    return message


# -- the real pipeline: one API node and `aip worker` nodes on one PostgreSQL --------------------


def _api_node(data_dir: Path, port: int) -> None:
    """`python -m bench.postgres_bench api-node DATA PORT` (AIP_DATABASE_URL set): the API on
    PostgreSQL, inbox off, with models that refuse to load, so its own worker never starts."""
    import uvicorn

    from bench.idle_service import _no_model
    from service.app import create_app
    from service.config import Settings
    from service.models.host import ModelHost

    settings = Settings(
        data_dir=data_dir,
        inbox=data_dir / "inbox",
        inbox_enabled=False,
        database_url=os.environ["AIP_DATABASE_URL"],
    )
    host = ModelHost(
        {"detector": "none", "reasoner": "none"},
        loaders={"detector": _no_model, "reasoner": _no_model},
        resolve_sources=False,
    )
    uvicorn.run(create_app(settings, host=host), host="127.0.0.1", port=port, log_level="error")


def _worker_cli() -> bool:
    return importlib.util.find_spec("service.cli.worker") is not None


@contextlib.contextmanager
def _nodes(
    url: str, work: Path, models: tuple[Path, Path], tokens: tuple[int, int], workers: int
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """The API node and `workers` worker nodes, each its own process and data directory;
    yields (API base URL, the worker processes)."""
    from bench import idle_service

    port = idle_service._free_port()
    env = {**os.environ, "AIP_DATABASE_URL": url, "AIP_LOG_STDERR": "0"}
    api = subprocess.Popen(
        [sys.executable, "-m", "bench.postgres_bench", "api-node", str(work / "api"), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker_env = {
        **env,
        "AIP_DETECTOR": str(models[0]),
        "AIP_REASONER": str(models[1]),
        "AIP_DETECT_MAX_TOKENS": str(tokens[0]),
        "AIP_REASON_MAX_TOKENS": str(tokens[1]),
        "AIP_INBOX_ENABLED": "0",
    }
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--database", url, "--data-dir",
             str(work / f"worker-{i}")],
            env=worker_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(workers)
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{base}/v1/health")
                break
            if api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark's API node did not start")
            time.sleep(0.1)
        yield base, nodes
    finally:
        for process in [*nodes, api]:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
            process.terminate()
        for process in [*nodes, api]:
            process.wait(timeout=60)


def _burst_rows(quick: bool, fresh: Callable[[], str], work: Path) -> list[Row]:
    size = "tiny" if quick else "small"
    measure = f"real pipeline burst, 2 vs 1 `aip worker` processes ({size})"
    if not _worker_cli():
        return [
            Row(
                measure,
                None,
                None,
                None,
                "",
                None,
                "jobs/s",
                note="not measured: `aip worker` (service/cli/worker.py) is not in this tree "
                "yet; the code runs one API node and `aip worker --database URL --data-dir D` "
                "nodes with AIP_DETECTOR/AIP_REASONER as soon as it is",
            )
        ]
    from bench.overhead_bench import CHECKPOINTS, _frame, _service_rate
    from service.models import tiny

    # Quick: few, short jobs (detection tokens capped too), so the whole run stays ~1 min.
    burst, rounds, tokens = (2, 1, (32, 8)) if quick else (6, 2, (256, 32))
    models = tiny.build_checkpoints(CHECKPOINTS / size, size)
    counter = iter(range(10**6))
    images = lambda n: [_frame(next(counter)) for _ in range(n)]  # noqa: E731
    url = fresh()
    loop = asyncio.new_event_loop()
    try:
        with _nodes(url, work, models, tokens, workers=2) as (api, nodes):
            # Both warm (models loaded, first calls compiled), then the second paused for
            # the 1-worker rounds: it holds no job between bursts, so it takes none.
            loop.run_until_complete(_service_rate(api, images(2)))

            def rate(workers: int) -> float:
                nodes[1].send_signal(signal.SIGCONT if workers == 2 else signal.SIGSTOP)
                return loop.run_until_complete(_service_rate(api, images(burst)))

            samples = interleaved({"2": lambda: rate(2), "1": lambda: rate(1)}, rounds)
    finally:
        loop.close()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(DISTINCT worker) FROM job_attempts").fetchone()
        nodes_seen = row[0] if row else 0
    return [
        compare(
            measure,
            median(samples["2"]),
            median(samples["1"]),
            unit="jobs/s",
            note=f"bursts of {burst} 640×480 JPEGs submitted to an API node (no worker of its "
            f"own), ≤ {tokens[0]} detection and {tokens[1]} reasoning tokens; {nodes_seen} "
            f"distinct worker nodes ran jobs; {rounds} rounds interleaved, the second worker "
            "paused (SIGSTOP) in the 1-worker rounds; span: first submit to the last "
            "finished_at; every process on the same cores, so 2 workers share them"
            + ("; quick: tiny checkpoints (the row is on small: full run)" if quick else ""),
        )
    ]


# -- the benchmark -------------------------------------------------------------------------------


def run(quick: bool) -> list[Row]:
    jobs, rounds = (60, 2) if quick else (400, 5)
    work = Path(tempfile.mkdtemp(prefix="aip-bench-postgres-"))
    salts = iter(range(10**9))
    pool = Pool(max(WORKERS))
    try:
        with pg_server.running() as fresh:
            targets = {kind: fresh() for kind in ("ours", "psycopg", "asyncpg")}
            targets["sqlite"] = str(work / "sqlite.db")
            migrate(Path(targets["sqlite"]))

            def rate(kind: str, workers: int) -> Callable[[], float]:
                def measure() -> float:
                    _enqueue(targets[kind], jobs, f"{kind}-{next(salts)}")
                    done, span = pool.drain(kind, targets[kind], work, workers)
                    if done != jobs:
                        raise RuntimeError(f"{kind}: {done} of {jobs} jobs done")
                    return jobs / span

                return measure

            samples: dict[int, dict[str, list[float]]] = {}
            for workers in WORKERS:
                kinds = ("ours", "psycopg") + (("sqlite", "asyncpg") if workers == 1 else ())
                samples[workers] = interleaved({k: rate(k, workers) for k in kinds}, rounds)
            burst = _burst_rows(quick, fresh, work)
    finally:
        pool.close()
    return [*_rows(samples, jobs, rounds), *burst]


def _rows(samples: dict[int, dict[str, list[float]]], jobs: int, rounds: int) -> list[Row]:
    sized = f"{jobs} jobs enqueued up front × {rounds} rounds, interleaved"
    rows = [
        compare(
            f"postgres claim loop, {n} worker{'s' if n > 1 else ''}, vs raw psycopg SKIP LOCKED",
            median(samples[n]["ours"]),
            median(samples[n]["psycopg"]),
            unit="jobs/s",
            at_least=0.5,
            note=f"null pipeline; {n} spawned processes each with its own PgQueue (claim, then "
            "complete_and_claim until empty) vs as many running the same statements on raw "
            "psycopg (autocommit off, prepared, clock_timestamp() inline); span: first claim "
            f"to last completion across processes; fsync on; {sized}",
        )
        for n in WORKERS
    ]
    one = samples[1]
    rows.append(
        compare(
            "claim loop, 1 worker: PostgreSQL vs SQLite (ours both)",
            median(one["ours"]),
            median(one["sqlite"]),
            unit="jobs/s",
            note=f"the same loop on PgQueue vs Queue (SQLite WAL, synchronous=FULL), one "
            f"process each; informative, no target; {sized}",
        )
    )
    faster = "psycopg 3" if median(one["psycopg"]) >= median(one["asyncpg"]) else "asyncpg"
    rows.append(
        compare(
            "raw claim loop, 1 process: psycopg 3 vs asyncpg",
            median(one["psycopg"]),
            median(one["asyncpg"]),
            unit="jobs/s",
            note=f"{faster} is faster in this run; the same statements, prepared on both "
            "(psycopg prepare=True, asyncpg Connection.prepare), one transaction a job; the "
            "service uses psycopg 3, synchronous on its writer thread, where a blocking "
            f"driver costs no event-loop hop of its own; {sized}",
        )
    )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["api-node"]:
        _api_node(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main_for("postgres", run, __doc__)
