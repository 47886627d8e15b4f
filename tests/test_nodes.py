"""Worker nodes on a shared PostgreSQL store: registered, beating, shown by GET /v1/nodes as
alive, lost or stopped; one inbox watched by one node; `aip worker` as a process of its own."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.cli import main
from service.store import nodes as store
from service.store.postgres.queue import PgQueue
from tests.conftest import RunningService, make_settings, psycopg_connect, subprocess_env, until


def nodes(service: RunningService) -> list[dict[str, Any]]:
    answer = service.client.get("/v1/nodes")
    assert answer.status_code == 200, answer.text
    return answer.json()["nodes"]


def test_two_nodes_on_one_database_are_both_alive(
    serve: Callable[..., RunningService], tmp_path: Path, pg_url: str
) -> None:
    a = serve(make_settings(tmp_path / "a", database_url=pg_url, inbox_enabled=False))
    b = serve(make_settings(tmp_path / "b", database_url=pg_url, inbox_enabled=False))
    listed = {node["id"]: node for node in nodes(b)}
    assert set(listed) == {a.services.worker.id, b.services.worker.id}
    for node in listed.values():
        assert node["state"] == "alive"
        assert node["role"] == "serve"
        assert node["pid"] > 0 and node["host"]
        assert set(node["models"]) == {"detector", "reasoner"}
        assert node["profiles"] is None
        assert node["last_heartbeat"].endswith("Z") and node["started_at"].endswith("Z")
        assert node["seconds_since_heartbeat"] >= 0

    b.stop()
    (gone,) = [n for n in nodes(a) if n["id"] == b.services.worker.id]
    assert gone["state"] == "stopped"
    assert gone["stopped_at"] is not None and gone["current_job"] is None


def test_sqlite_lists_its_one_node(serve: Callable[..., RunningService], tmp_path: Path) -> None:
    service = serve(make_settings(tmp_path, inbox_enabled=False))
    (node,) = nodes(service)
    assert node["id"] == service.services.worker.id and node["state"] == "alive"


def test_a_node_whose_beats_stop_is_lost_and_forgotten_after_a_day(pg_url: str) -> None:
    async def scenario() -> None:
        queue = await PgQueue.connect(pg_url, Path.cwd())
        try:
            node = store.Node("h:1:abcdef", "h", 1, "worker", {}, ("a", "b"))
            await store.register(queue, node)
            (row,) = await store.listing(queue)
            assert store.view(row)["state"] == "alive"
            assert store.view(row)["profiles"] == ["a", "b"]
            # It never beats again: three short beats later, by the database's clock, lost.
            deadline = time.monotonic() + 30
            while (
                store.view((await store.listing(queue, heartbeat_seconds=0.05))[0])["state"]
                != "lost"
            ):
                assert time.monotonic() < deadline, "never shown lost"
                await asyncio.sleep(0.05)
            # A node dead for two days is deleted by any other node's beat.
            with psycopg_connect(pg_url) as conn:
                conn.execute("UPDATE nodes SET heartbeat_at = heartbeat_at - 2 * 86400")
            other = store.Node("h:2:123456", "h", 2, "serve", {}, None)
            await store.register(queue, other)
            assert await store.beat(queue, other.id, store.Beat(None, 0, {}))
            assert [r[0] for r in await store.listing(queue)] == [other.id]
            # A beat of a stopped node does not revive it; its register does.
            await store.stop(queue, other.id, 3)
            assert not await store.beat(queue, other.id, store.Beat(None, 3, {}))
        finally:
            await queue.close()

    asyncio.run(scenario())


def test_one_inbox_is_watched_by_one_node_of_a_database(
    serve: Callable[..., RunningService], tmp_path: Path, pg_url: str
) -> None:
    inbox = tmp_path / "inbox"
    first = serve(make_settings(tmp_path / "a", database_url=pg_url, inbox=inbox))
    second = serve(make_settings(tmp_path / "b", database_url=pg_url, inbox=inbox))
    assert first.services.inbox is not None
    assert second.services.inbox is None  # started, serving, without the inbox
    assert second.client.get("/v1/health").status_code == 200
    assert second.client.get("/v1/inbox").json() == {"enabled": False, "standby": True}
    refused = second.client.post("/v1/inbox/reprocess", json={"path": "x.jpg"})
    assert refused.status_code == 409 and refused.json()["code"] == "inbox_elsewhere"
    first.stop()
    third = serve(make_settings(tmp_path / "c", database_url=pg_url, inbox=inbox))
    # The standby took over, or the newcomer did: one of them watches, never both.
    assert (second.services.inbox is None) != (third.services.inbox is None)


def test_worker_without_a_database_refuses_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("AIP_DATABASE_URL", raising=False)
    assert main(["worker", "--data-dir", str(tmp_path), "--demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AIP_DATABASE_URL" in err and "Traceback" not in err
    assert not (tmp_path / "models").exists()  # refused before building anything


def test_worker_node_works_jobs_an_api_node_queued(
    serve: Callable[..., RunningService], tmp_path: Path, pg_url: str
) -> None:
    # An API node whose models cannot load: its own worker never starts, so only the
    # worker node can run the job.
    missing = str(tmp_path / "no-such-model")
    api = serve(
        make_settings(
            tmp_path / "api",
            database_url=pg_url,
            inbox_enabled=False,
            detector=missing,
            reasoner=missing,
        ),
        host=None,
    )
    log = (tmp_path / "worker.log").open("wb")
    command = ["worker", "--database", pg_url, "--demo", "--data-dir", str(tmp_path / "w")]
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *command],
        env=subprocess_env(tmp_path / "w" / "inbox"),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        worker = until(
            lambda: [n for n in nodes(api) if n["role"] == "worker"], timeout=120, what="registered"
        )[0]
        assert worker["state"] == "alive" and worker["pid"] == process.pid
        job_id = api.submit().json()["id"]
        assert api.wait(job_id)["status"] == "succeeded"
        until(
            lambda: [n for n in nodes(api) if n["id"] == worker["id"] and n["jobs_done"] == 1],
            what="counted by the worker node's beat",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    (after,) = [n for n in nodes(api) if n["id"] == worker["id"]]
    assert after["state"] == "stopped" and after["stopped_at"] is not None
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


def test_dashboard_has_a_nodes_page(serve: Callable[..., RunningService], tmp_path: Path) -> None:
    service = serve(make_settings(tmp_path, inbox_enabled=False))
    page = service.client.get("/nodes", headers={"Accept": "text/html"})
    assert page.status_code == 200 and 'href="/nodes"' in page.text
    script = service.client.get("/static/pages/nodes.js")
    assert script.status_code == 200 and "/v1/nodes" in script.text
