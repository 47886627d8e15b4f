"""Shared fixtures: tiny checkpoints built once, a loaded model host shared by every service
started in a test, a real uvicorn server on 127.0.0.1, and images made on the fly."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.detection import Detection
from service.models.host import ModelHost

# A test run started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every `aip` it starts: the Ctrl-C tests would then wait forever. A
# handler here (reset to the default in each child at exec) gives them a Ctrl-C that works.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from service.models.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def model_host(tiny_checkpoints: tuple[Path, Path]) -> Iterator[ModelHost]:
    """Both tiny models loaded once through mlx-vlm and shared by every service in the run."""
    detector, reasoner = tiny_checkpoints
    host = ModelHost({"detector": str(detector), "reasoner": str(reasoner)})
    asyncio.run(host.load_all())
    yield host
    asyncio.run(host.close())


def make_image(
    width: int = 320,
    height: int = 240,
    fmt: str = "JPEG",
    color: tuple[int, int, int] = (40, 120, 200),
    **save: Any,
) -> bytes:
    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, 16):  # some structure, so encoders have something to chew
        image.paste((x % 255, 255 - x % 255, 90), (x, 0, x + 8, height // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


class Gate:
    """Wraps the real detector: signals when inference starts, holds it until released."""

    def __init__(self, real: Any, hold: Callable[[], bool] | None = None) -> None:
        self.real = real
        self.inside = threading.Event()
        self.release = threading.Event()
        self.hold = hold or (lambda: self.release.wait(timeout=60))

    def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Any]:
        self.inside.set()
        self.hold()
        return list(self.real.detect(image, query, **kw))


def db_rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    """Rows read straight from a database file, outside the service."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def gate_detector(service: RunningService, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Gate:
    """Put a Gate around the service's detector for the rest of the test."""
    state = service.services.host.roles["detector"]
    gate = Gate(state.runtime, **kw)
    monkeypatch.setattr(state, "runtime", gate)
    return gate


class RunningService:
    """The real app under uvicorn on a free loopback port, in a background thread."""

    def __init__(self, settings: Settings, host: ModelHost | None) -> None:
        self.settings = settings
        self.app = create_app(settings, host=host)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def _run(self) -> None:
        # uvicorn exits when start-up fails; start() reports it.
        with contextlib.suppress(SystemExit):
            self.server.run(sockets=[self._socket])

    def start(self) -> RunningService:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("service did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        # Event streams never end by themselves, and uvicorn waits for every open response.
        with contextlib.suppress(AttributeError):
            self.services.events.close()
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self.client.close()

    @property
    def services(self) -> Any:
        return self.app.state.services

    def submit(
        self, image: bytes | None = None, name: str = "frame.jpg", **data: Any
    ) -> httpx.Response:
        return self.client.post(
            "/v1/jobs", files={"image": (name, image or make_image(), "image/jpeg")}, data=data
        )

    def wait(
        self,
        job_id: int,
        statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
        timeout: float = 120,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(0.05)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def subprocess_env(
    inbox: Path, checkpoints: tuple[Path, Path] | None = None, **settings: str | Path
) -> dict[str, str]:
    """The environment of an `aip` started as a process: none of this machine's AIP_* values,
    its own inbox, the tiny checkpoints when given, and `settings` as AIP_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIP_")}
    env["AIP_INBOX"] = str(inbox)
    env["AIP_QUERIES"] = ",".join(QUERIES)
    if checkpoints:
        env["AIP_DETECTOR"], env["AIP_REASONER"] = map(str, checkpoints)
    env.update({f"AIP_{name.upper()}": str(value) for name, value in settings.items()})
    return env


# Jobs under test detect these unless they say otherwise: with no queries from anywhere a
# job is planned (the service's default), which only the tests about planning want.
QUERIES = ("person", "vehicle", "building")


def start_process(
    data_dir: Path, port: int, checkpoints: tuple[Path, Path], **settings: str | Path
) -> subprocess.Popen[bytes]:
    """`aip serve` as a process of its own on the tiny checkpoints (a kill -9 kills it alone),
    returned once healthy; `settings` as in `subprocess_env`."""
    env = subprocess_env(
        data_dir / "inbox", checkpoints, data_dir=data_dir, port=str(port), **settings
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode() if process.stderr else "exited")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("service did not become healthy")


def until(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """`check()`'s first true value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {timeout} s")
        time.sleep(0.05)
    return value


def make_settings(tmp_path: Path, **changes: Any) -> Settings:
    """Settings for a service under test: its own data dir, short generations, QUERIES."""
    defaults: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "default_queries": QUERIES,
        "poll_interval_seconds": 0.2,
        "reason_max_tokens": 24,
    }
    return Settings(**{**defaults, **changes})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def serve(model_host: ModelHost) -> Iterator[Callable[..., RunningService]]:
    """Start services (stopped at the end of the test); all share the loaded tiny models."""
    started: list[RunningService] = []

    def _serve(settings: Settings, host: ModelHost | None = model_host) -> RunningService:
        service = RunningService(settings, host).start()
        started.append(service)
        return service

    yield _serve
    for service in started:
        if service._thread.is_alive():
            service.stop()


PG_TEMPLATE = "aip_template"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster for the run, holding one migrated template database
    (PG_TEMPLATE) that `pg_url` clones. Skipped without server binaries; with CI set, fails."""
    from tests.postgres_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None and os.environ.get("CI"):
        failed = apt_install("postgresql")
        bindir = find_bindir()
        if bindir is None:
            pytest.fail(f"CI: could not install PostgreSQL's server: {failed}")
    if bindir is None:
        pytest.skip(
            "PostgreSQL tests skipped: install PostgreSQL 15 server binaries (Debian: apt-get "
            "install postgresql) or set AIP_PG_BIN to their folder; with CI set they install it "
            "and must run"
        )
    from service.store.postgres.migrate import migrate as migrate_postgres

    server = PostgresServer(bindir)
    try:
        with psycopg_connect(server.url()) as conn:
            conn.execute(f"CREATE DATABASE {PG_TEMPLATE}")
        migrate_postgres(server.url(PG_TEMPLATE))
        yield server
    finally:
        server.stop()


def psycopg_connect(url: str) -> Any:
    """An autocommit psycopg connection (imported here: only PostgreSQL tests need it)."""
    import psycopg

    return psycopg.connect(url, autocommit=True)


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """A fresh, migrated, empty database for one test (a copy of the template: fast)."""
    return str(postgres.create_database(template=PG_TEMPLATE))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (the embedded SQLite file) or a fresh, migrated PostgreSQL database: a test that
    takes it runs against both store backends (`make_settings(..., database_url=...)`)."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def pg_empty_url(postgres: Any) -> str:
    """A fresh database with no schema at all, for tests of migrating itself."""
    return str(postgres.create_database())


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def _chromium() -> Path | None:
    """Debian's chromium (AIP_TEST_CHROMIUM names another Chromium or Chrome binary); on CI,
    installed from Debian's packages when missing."""
    found = Path(os.environ.get("AIP_TEST_CHROMIUM", "/usr/bin/chromium"))
    if found.is_file() or not os.environ.get("CI"):
        return found if found.is_file() else None
    failed = apt_install("chromium")
    if failed or not found.is_file():
        pytest.fail(f"CI: could not install chromium: {failed}")
    return found


def apt_install(package: str) -> str | None:
    """Install a Debian package the tests need (CI runs them on a fresh machine); None once
    done, else what went wrong."""
    import subprocess

    install = f"apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q {package}"
    command = ["sh", "-c", install if os.geteuid() == 0 else f"sudo -n sh -c '{install}'"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else f"{install}: {done.stderr[-500:]}"


@pytest.fixture(scope="session")
def chromium_session() -> Iterator[tuple[Any, asyncio.AbstractEventLoop]]:
    """One headless Chromium for the whole run, driven by Playwright (never its own download),
    and the event loop Playwright drives it from."""
    how = (
        "browser tests skipped: install Chromium (Debian: apt-get install chromium) or set "
        "AIP_TEST_CHROMIUM to a Chromium binary; with CI set they install it and must run"
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI: playwright is missing; pip install -e '.[test]'")
        pytest.skip(how)
    executable = _chromium()
    if executable is None:
        pytest.skip(how)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        # Playwright's sync API leaves its loop marked as this thread's running loop, which
        # would make every later test's asyncio.run() fail: marked only inside browser tests.
        loop = asyncio.get_running_loop()
        asyncio._set_running_loop(None)
        yield chromium, loop
        asyncio._set_running_loop(loop)
        chromium.close()


@pytest.fixture
def browser(chromium_session: tuple[Any, asyncio.AbstractEventLoop]) -> Iterator[Any]:
    """The session's Chromium, for one test."""
    chromium, loop = chromium_session
    asyncio._set_running_loop(loop)
    try:
        yield chromium
    finally:
        asyncio._set_running_loop(None)


class InstantDetector:
    def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
        return []


class InstantReasoner:
    def reason(self, image: Image.Image, prompt: str, **kw: Any) -> str:
        return "ok"


def stand_in_host(detector: Any, reasoner: Any = None) -> ModelHost:
    """A model host serving these stand-ins (the reasoner answers "ok" at once by default)."""
    return ModelHost(
        {"detector": "stand-in", "reasoner": "stand-in"},
        loaders={
            "detector": lambda p: detector,
            "reasoner": lambda p: reasoner or InstantReasoner(),
        },
        resolve_sources=False,
    )


@pytest.fixture
def inbox_service(tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    """Services whose models answer at once: these tests are about files, not inference."""
    started: list[RunningService] = []

    def _serve(**changes: Any) -> RunningService:
        host = stand_in_host(InstantDetector())
        defaults = {
            "inbox": tmp_path / "inbox",
            "inbox_settle_seconds": 0.3,
            "inbox_rescan_seconds": 3600.0,
        }
        service = RunningService(make_settings(tmp_path, **{**defaults, **changes}), host)
        started.append(service.start())
        return service

    yield _serve
    for service in started:
        if service._thread.is_alive():
            service.stop()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Slow waits on the network start before the first test, to overlap the others."""
    if any(item.name.startswith("test_the_resolver_installs") for item in session.items):
        from tests.test_install import start_dry_runs

        start_dry_runs()
