"""Three `aip worker` processes and one `aip serve` node on one PostgreSQL, killed with SIGKILL
at random moments and restarted while 300 jobs go in: every accepted job ends exactly once, a
killed node's leases are rescued by another node, and a node whose clock is an hour off (ahead,
then behind) neither steals live leases nor keeps dead ones."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, make_image, psycopg_connect, subprocess_env, until

pytestmark = pytest.mark.slow

# Short, so rescues are quick; long enough that a loaded machine's stalls (seen: 3 s with two
# cores shared) do not expire a live node's lease, which this test counts as a steal.
LEASE = 3.5
# Correctness, not speed: the lease runs out and the next check (every lease / 4) requeues
# the job. Generous for a loaded CI machine.
RESCUE_BOUND = 3 * LEASE + 10
# Then claimed by the first node to finish its job, or to load its models after a restart.
CLAIM_BOUND = 120.0
JOBS, WAVE = 300, 10
HOUR = 3600.0
TERMINAL = ("succeeded", "failed", "cancelled")
SETTINGS = {
    "lease_seconds": str(LEASE),
    "detect_max_tokens": "4",
    "reason_max_tokens": "4",
    "max_attempts": "10",  # a job whose node is killed more than once still succeeds
    "queries": "person",
}
# Every time a node takes from its own clock goes through time.time: shift it for the
# process's whole life, before the service is imported.
SHIFTED = (
    "import sys, time; _real = time.time; time.time = lambda: _real() + {offset!r}; "
    "from service.cli import main; sys.exit(main())"
)
STARTED = re.compile(r"^(\S+ \S+) INFO aip: worker node \S+:(\d+):\w+ working the queue", re.M)


@dataclass
class Life:
    """One process of a node, from start to kill (or to the stop at the end)."""

    node: str
    process: subprocess.Popen[bytes]
    offset: float
    started: float
    killed: float | None = None
    held: list[tuple[int, int]] = field(default_factory=list)  # (job, attempt) at the kill

    @property
    def pid(self) -> int:
        return self.process.pid


class Db:
    """The test's own view of the shared database (one autocommit connection per thread)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg_connect(url)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql, args).fetchall())

    def held_by(self, pid: int) -> list[tuple[int, int]]:
        return [
            (job, attempt)
            for job, attempt in self.rows(
                "SELECT id, attempts FROM jobs WHERE status = 'running' AND lease_owner LIKE %s",
                f"%:{pid}:%",
            )
        ]

    def succeeded_by(self, pid: int) -> int:
        return int(
            self.rows(
                "SELECT count(*) FROM job_attempts WHERE outcome = 'succeeded' AND worker LIKE %s",
                f"%:{pid}:%",
            )[0][0]
        )

    def close(self) -> None:
        self.conn.close()


class Cluster:
    """The API node (intake) and three worker nodes as processes of their own, each with its own
    data directory, all on one database and the tiny checkpoints."""

    WORKERS = ("w0", "w1", "w2")

    def __init__(self, root: Path, url: str, checkpoints: tuple[Path, Path]) -> None:
        self.root, self.url, self.checkpoints = root, url, checkpoints
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.current: dict[str, Life] = {}
        self.lives: list[Life] = []
        self.lock = threading.Lock()  # the killer and the restarts change `current` together
        (root / "stderr").mkdir(parents=True)

    def start(self, node: str, offset: float = 0.0) -> Life:
        data_dir = self.root / node
        if node == "api":
            settings: dict[str, str | Path] = {
                "data_dir": data_dir,
                "port": str(self.port),
                "database_url": self.url,
            }
            # Intake only: its worker waits for a profile no job names, so the three worker
            # nodes do the work.
            env = subprocess_env(
                data_dir / "inbox",
                self.checkpoints,
                inbox_enabled="0",
                worker_profiles="intake-only",
                **settings,
                **SETTINGS,
            )
            args = ["serve", "--log-level", "warning"]
        else:
            env = subprocess_env(data_dir / "inbox", self.checkpoints, **SETTINGS)
            args = ["worker", "--database", self.url, "--data-dir", str(data_dir)]
        with (self.root / "stderr" / f"{node}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", SHIFTED.format(offset=offset), *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        life = Life(node, process, offset, time.time())
        with self.lock:
            self.current[node] = life
            self.lives.append(life)
        return life

    def up(self, node: str) -> Life | None:
        with self.lock:
            return self.current.get(node)

    def kill(self, node: str, db: Db) -> Life:
        with self.lock:
            life = self.current.pop(node)
        life.killed = time.time()
        life.process.send_signal(signal.SIGKILL)
        life.process.wait(timeout=30)
        life.held = db.held_by(life.pid)  # what it held when it died: nobody else holds it
        return life

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every node still running: the clean stop; their exit statuses."""
        for life in self.current.values():
            if life.process.poll() is None:
                life.process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for node, life in self.current.items():
            try:
                codes[node] = life.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                life.process.kill()
                codes[node] = None
        return codes

    def kill_all(self) -> None:
        for life in self.lives:
            if life.process.poll() is None:
                life.process.kill()
                life.process.wait(timeout=30)

    def stderr(self) -> str:
        lives = "".join(
            f"{life.node} pid {life.pid} clock {life.offset:+g} s, started {life.started:.2f},"
            f" killed {life.killed}\n"
            for life in self.lives
        )
        return lives + "".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted((self.root / "stderr").iterdir())
        )


class Submitter(threading.Thread):
    """Posts JOBS jobs in waves of WAVE, each once the queue runs low and `may_submit(wave)`,
    through whichever API node is up: a request whose connection dies (the node was killed)
    is sent again with the same Idempotency-Key until it is answered."""

    def __init__(self, api: str, url: str, may_submit: Callable[[int], bool]) -> None:
        super().__init__(daemon=True)
        self.api, self.url, self.may_submit = api, url, may_submit
        self.accepted: dict[str, int] = {}
        self.answers: Counter[str] = Counter()
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        db = Db(self.url)
        try:
            with httpx.Client(timeout=30) as client:
                for i in range(JOBS):
                    if i % WAVE == 0:
                        self._wait_for_turn(db, i // WAVE)
                    if not self._submit(client, i):
                        return
        except Exception as exc:  # reported by the test, which joins this thread
            self.errors.append(repr(exc))
        finally:
            db.close()

    def _wait_for_turn(self, db: Db, wave: int) -> None:
        while not self.stopping.is_set():
            (queued,) = db.rows("SELECT count(*) FROM jobs WHERE status = 'queued'")[0]
            if queued < WAVE // 2 and self.may_submit(wave):
                return
            time.sleep(0.1)

    def _submit(self, client: httpx.Client, i: int) -> bool:
        key = f"crash-{i}"
        image = make_image(48 + i % 16, 48, color=(i % 256, (i // 256) * 60, 160))
        while not self.stopping.is_set():
            try:
                answer = client.post(
                    f"{self.api}/v1/jobs",
                    files={"image": (f"{i}.jpg", image, "image/jpeg")},
                    data={"queries": "person"},
                    headers={"Idempotency-Key": key},
                )
            except httpx.TransportError:
                self.answers["connection lost"] += 1
                time.sleep(0.1)
                continue
            self.answers[str(answer.status_code)] += 1
            if answer.status_code in (200, 202):
                self.accepted[key] = answer.json()["id"]
                return True
            if answer.status_code != 503:  # 503: the node is still starting
                self.errors.append(f"{key}: {answer.status_code} {answer.text[:300]}")
                return False
            time.sleep(0.1)
        return False


@dataclass
class Rescue:
    node: str
    offset: float
    job: int
    attempt: int
    requeued: float | None = None  # seconds from the kill to the attempt declared lost
    claimed: float | None = None  # seconds from the kill to another node's attempt
    # None, None: the dead node's own last commit, in flight at the kill, had finished it


def await_rescue(db: Db, life: Life, job: int, attempt: int) -> Rescue:
    """Wait until `life`'s attempt of `job` is declared lost (within RESCUE_BOUND of the
    kill) and another node runs the job again (within CLAIM_BOUND: a node must be free)."""
    killed = life.killed
    assert killed is not None
    rescue = Rescue(life.node, life.offset, job, attempt)
    while True:
        rows = db.rows(
            "SELECT attempt, worker, outcome, started_at, finished_at FROM job_attempts"
            " WHERE job_id = %s AND attempt >= %s ORDER BY attempt",
            job,
            attempt,
        )
        (mine,) = [r for r in rows if r[0] == attempt]
        later = [r for r in rows if r[0] > attempt]
        if mine[2] == "succeeded" and not later:
            return rescue
        what = f"job {job} attempt {attempt} of killed {life.node} (pid {life.pid}, clock "
        what += f"{life.offset:+g} s): {rows}"
        if mine[2] is None:
            assert time.time() < killed + RESCUE_BOUND, f"not lost in {RESCUE_BOUND} s: {what}"
        else:
            assert mine[2] == "lost", what
            rescue.requeued = mine[4] - killed  # the database's clock, this machine's
        if later:
            assert node_pid(later[0][1]) != life.pid, what
            rescue.claimed = later[0][3] - killed
            return rescue
        assert time.time() < killed + CLAIM_BOUND, f"not run again in {CLAIM_BOUND} s: {what}"
        time.sleep(0.05)


def node_pid(node_id: str) -> int:
    """The pid in a node id, `host:pid:hex`."""
    return int(node_id.rsplit(":", 2)[1])


KILLS = 22
SWITCH = 10  # the kill of the ahead node, after which one an hour behind runs as w2


class Killer:
    """SIGKILLs KILLS times a random node at a random moment: the API node at three random
    turns, otherwise a random worker node that is running a job, while at least one other
    worker is up to rescue it; w2 last in each phase (an hour ahead, then behind), once it has
    run a job. A killed node stays down until its jobs are rescued, by another node, not its
    own restart; the next kills do not wait for that."""

    def __init__(self, cluster: Cluster, db: Db, rng: random.Random) -> None:
        self.cluster, self.db, self.rng = cluster, db, rng
        self.done = 0  # kills whose node is back up
        self.turn = 0  # the kill under way
        # Waves of jobs the submitter may send: one more each time the killer waits for work
        # and nothing is queued, so jobs last as long as the kills (however fast they run).
        self.fed = 2
        self.rescues: list[Rescue] = []
        self.failures: list[BaseException] = []
        self._restarts: list[threading.Thread] = []
        self._lock = threading.Lock()
        others = [turn for turn in range(KILLS) if turn not in (SWITCH, KILLS - 1)]
        self.api_turns = set(rng.sample(others, 3))

    def run(self) -> None:
        for turn in range(KILLS):
            self.turn = turn
            time.sleep(self.rng.uniform(0.2, 1.2))
            if turn in (SWITCH, KILLS - 1):
                node = self._w2_at_work()
            elif turn in self.api_turns:
                until(lambda: self.cluster.up("api"), 120, "the API node up")
                node = "api"
            else:
                node = self._random_worker_at_work()
            dead = self.cluster.kill(node, self.db)
            offset = -HOUR if node == "w2" and turn == SWITCH else dead.offset
            restart = threading.Thread(target=self._rescued_then_restart, args=(dead, offset))
            restart.start()
            self._restarts.append(restart)
        for restart in self._restarts:
            restart.join()
        assert not self.failures, self.failures

    def _rescued_then_restart(self, dead: Life, offset: float) -> None:
        try:
            rescues = [await_rescue(self.db, dead, job, at) for job, at in dead.held]
            self.cluster.start(dead.node, offset)
        except BaseException as exc:  # reported by run(), in the test's thread
            self.failures.append(exc)
            rescues = []
        with self._lock:
            self.rescues += rescues
            self.done += 1

    def _random_worker_at_work(self) -> str:
        deadline = time.monotonic() + 120
        while True:
            up = {node: life for node in Cluster.WORKERS if (life := self.cluster.up(node))}
            working = [node for node, life in up.items() if self.db.held_by(life.pid)]
            if len(up) >= 2 and (working or time.monotonic() > deadline):
                return self.rng.choice(working or list(up))
            self._feed()
            time.sleep(0.05)

    def _w2_at_work(self) -> str:
        # A wait for the moment to kill, not a bound under test: a loaded machine restarts
        # (loads, warms up) slowly.
        deadline = time.monotonic() + 480
        while True:
            w2 = self.cluster.up("w2")
            others = [node for node in Cluster.WORKERS[:2] if self.cluster.up(node)]
            if w2 and others and self.db.held_by(w2.pid) and self.db.succeeded_by(w2.pid):
                return "w2"
            assert time.monotonic() < deadline, "w2 never ran a job after finishing one"
            self._feed()
            time.sleep(0.05)

    def _feed(self) -> None:
        """One more wave once nothing is queued (the workers ran out of jobs)."""
        ((queued, total),) = self.db.rows(
            "SELECT count(*) FILTER (WHERE status = 'queued'), count(*) FROM jobs"
        )
        if queued == 0:  # the wave being sent counts: jobs in the table, by whole waves
            self.fed = max(self.fed, total // WAVE + 1)

    def may_submit(self, wave: int) -> bool:
        """The waves spread over the kills (and one more whenever the workers run dry), and
        every wave once the kills are done."""
        spread = wave * KILLS < (self.turn + 1) * (JOBS // WAVE)
        return spread or wave < self.fed or self.done == KILLS


def test_nodes_killed_at_random_lose_nothing_double_nothing_and_ignore_their_clocks(
    tmp_path: Path, tiny_checkpoints: tuple[Path, Path], pg_url: str
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    cluster = Cluster(tmp_path, pg_url, tiny_checkpoints)
    db = Db(pg_url)
    killer = Killer(cluster, db, rng)
    submitter = Submitter(cluster.api, pg_url, killer.may_submit)
    began = time.monotonic()
    try:
        cluster.start("api")
        for node in Cluster.WORKERS:
            cluster.start(node, HOUR if node == "w2" else 0.0)
        submitter.start()
        killer.run()
        kills_done = time.monotonic()
        submitter.join(timeout=360)
        assert not submitter.is_alive(), f"submissions still going: {submitter.answers}"
        assert not submitter.errors, submitter.errors
        until(
            lambda: (
                db.rows(
                    "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled')),"
                    " count(*) FROM jobs"
                )[0]
                == (JOBS, JOBS)
            ),
            360,
            "every job finished",
        )
        drained = time.monotonic()
        listed = httpx.get(f"{cluster.api}/v1/nodes", timeout=30).json()["nodes"]
        codes = cluster.stop()
    except BaseException:
        submitter.stopping.set()
        cluster.kill_all()
        print(f"seed {seed}\n{cluster.stderr()}")
        raise
    finally:
        db.close()

    failure = f"seed {seed}\n{cluster.stderr()}"
    assert codes == dict.fromkeys(["api", *Cluster.WORKERS], 0), failure
    killed = {life.pid: life for life in cluster.lives if life.killed is not None}
    assert len(killed) >= 20
    stats = check_store(pg_url, submitter.accepted, cluster.lives, failure)
    lives_listed = {node["pid"] for node in listed}
    assert {life.pid for life in cluster.current.values()} <= lives_listed, (listed, failure)
    check_clocks(tmp_path, cluster.lives, failure)

    rescued = [r for r in killer.rescues if r.claimed is not None]
    for offset in (HOUR, -HOUR):  # the clock-off node worked, and its dead leases were rescued
        assert [r for r in rescued if r.offset == offset], (offset, killer.rescues, failure)
        lives = [life for life in cluster.lives if life.offset == offset]
        assert stats["succeeded by life"].keys() & {life.pid for life in lives}, failure
    assert len(rescued) >= 10, (killer.rescues, failure)
    requeued = [r.requeued for r in rescued if r.requeued is not None]
    claimed = [r.claimed for r in rescued if r.claimed is not None]
    kills = dict(Counter(life.node for life in killed.values()))
    print(
        f"\nseed {seed}: {len(killed)} kills ({kills}),"
        f" {len(rescued)} rescues (lost after max {max(requeued):.2f} s, mean"
        f" {sum(requeued) / len(requeued):.2f} s; run again after max {max(claimed):.2f} s,"
        f" mean {sum(claimed) / len(claimed):.2f} s), {len(killer.rescues) - len(rescued)}"
        f" finished by the killed node's last commit; answers {dict(submitter.answers)};"
        f" {stats['jobs']}, {stats['lost attempts']} lost attempts, succeeded by"
        f" {stats['succeeded by']}; kills {kills_done - began:.0f} s, drained"
        f" {drained - began:.0f} s, total {time.monotonic() - began:.0f} s"
    )


def check_store(
    url: str, accepted: dict[str, int], lives: list[Life], failure: str
) -> dict[str, Any]:
    """Every accepted job once, ended once, with at most one result and one success."""
    killed = {life.pid: life for life in lives if life.killed is not None}
    db = Db(url)
    try:
        jobs = db.rows("SELECT id, idempotency_key, status, attempts FROM jobs ORDER BY id")
        attempts = db.rows(
            "SELECT job_id, attempt, worker, outcome, started_at, finished_at FROM job_attempts"
        )
        results = Counter(job for (job,) in db.rows("SELECT job_id FROM results"))
    finally:
        db.close()
    # No request, however often sent again, made a second job; none made a job unanswered.
    assert len(accepted) == JOBS
    assert sorted((key, job) for job, key, _, _ in jobs) == sorted(accepted.items())
    statuses = Counter(status for _, _, status, _ in jobs)
    assert statuses == {"succeeded": JOBS}, (statuses, failure)
    by_job: dict[int, list[tuple[Any, ...]]] = {}
    for row in attempts:
        by_job.setdefault(row[0], []).append(row)
    for job, _, _, count in jobs:
        runs = sorted(by_job.get(job, []), key=lambda r: r[1])
        # One row per attempt, numbered 1..attempts: no attempt was run twice.
        assert [r[1] for r in runs] == list(range(1, count + 1)), (job, runs, failure)
        assert all(r[5] is not None for r in runs), (job, runs)  # none left open
        assert [r[3] for r in runs].count("succeeded") == 1, (job, runs, failure)
        assert runs[-1][3] == "succeeded", (job, runs)
        assert results[job] == 1, (job, results[job])
    assert set(results) == {job for job, *_ in jobs}
    # A lease was declared lost only after its owner had been killed: never a live node's.
    lost = [r for r in attempts if r[3] == "lost"]
    for job, attempt, worker, _, _, finished in lost:
        owner = killed.get(node_pid(worker))
        assert owner is not None, f"job {job} attempt {attempt} of live {worker} lost\n{failure}"
        assert owner.killed is not None and finished >= owner.killed, (job, attempt, worker)
    # The three worker processes did most of the work.
    node_of = {life.pid: life.node for life in lives}
    done = Counter(
        "api" if node_of[node_pid(r[2])] == "api" else "workers"
        for r in attempts
        if r[3] == "succeeded"
    )
    assert done["workers"] > done["api"], (done, failure)
    return {
        "jobs": dict(statuses),
        "lost attempts": len(lost),
        "succeeded by": dict(done),
        "succeeded by life": Counter(node_pid(r[2]) for r in attempts if r[3] == "succeeded"),
    }


def check_clocks(root: Path, lives: list[Life], failure: str) -> None:
    """The shifted clocks were in force inside the service: its log lines are stamped with
    them (logging reads time.time)."""
    text = (root / "stderr" / "w2.log").read_text(errors="replace")
    stamped = {int(pid): stamp for stamp, pid in STARTED.findall(text)}
    seen = 0
    for life in lives:
        if life.node != "w2" or life.pid not in stamped:
            continue
        logged = datetime.strptime(stamped[life.pid], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        assert abs(logged - life.started - life.offset) < 600, (life, stamped, failure)
        seen += 1
    assert seen >= 2, (stamped, failure)
