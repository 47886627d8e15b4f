"""A throwaway PostgreSQL cluster for tests: initdb into a temporary folder, a server on a free
loopback port, a fresh database per test (cloned from a template), removed at the end."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

USER = "aip"


def find_bindir() -> Path | None:
    """AIP_PG_BIN, else the newest /usr/lib/postgresql/*/bin (Debian), else `pg_config
    --bindir`; None when none of them holds initdb."""
    candidates: list[Path] = []
    if os.environ.get("AIP_PG_BIN"):
        candidates.append(Path(os.environ["AIP_PG_BIN"]))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: -int(p.name))]
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if done.returncode == 0:
            candidates.append(Path(done.stdout.strip()))
    return next((c for c in candidates if (c / "initdb").is_file()), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One cluster, started at construction; `stop()` ends it and removes its folder."""

    _names = itertools.count(1)

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        # Not under pytest's tmp_path: those folders are mode 700 and root's, and the server
        # runs as the postgres user when we are root (it refuses to run as root).
        self.root = Path(tempfile.mkdtemp(prefix="aip-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        try:
            self._run(
                "initdb", "-D", str(self.data), "-A", "trust", "-U", USER,
                "--encoding", "UTF8", "--locale", "C",
            )  # fmt: skip
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port}"
                f" -c unix_socket_directories={self.root}"
                " -c fsync=on -c max_connections=200"
            )
            self._run(
                "pg_ctl", "start", "-D", str(self.data), "-w", "-t", "60",
                "-l", str(self.root / "server.log"), "-o", options,
            )  # fmt: skip
        except BaseException:
            self._remove()
            raise

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{program} failed: {done.stderr[-2000:]}{tail}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, template: str | None = None) -> str:
        """A new, uniquely named database (a copy of `template` when given); its URL."""
        name = f"aip_{next(self._names)}_{uuid.uuid4().hex[:8]}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        # A template must have no other connection while it is copied; one still closing
        # (a migrate that just returned) is given a moment.
        deadline = time.monotonic() + 10
        with psycopg.connect(self.url(), autocommit=True) as conn:
            while True:
                try:
                    conn.execute(query)
                    return self.url(name)
                except psycopg.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")
        finally:
            self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
