"""One inbox among API nodes on one PostgreSQL database: a standby node takes over when the
watching one stops, and a watching node whose lock session ends takes the lock again."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.inbox import standby
from service.inbox.lock import advisory_key
from tests.conftest import RunningService, make_image, make_settings, psycopg_connect, until


@pytest.fixture(autouse=True)
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standby, "CHECK_SECONDS", 0.3)


def inbox_status(service: RunningService) -> dict[str, Any]:
    answer = service.client.get("/v1/inbox")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def inbox_jobs(service: RunningService) -> list[dict[str, Any]]:
    return list(service.client.get("/v1/jobs", params={"source": "inbox"}).json()["jobs"])


def lock_holders(url: str, inbox: Path) -> list[int]:
    """Backend pids holding the inbox's advisory lock (a bigint key: high and low halves)."""
    key = advisory_key(inbox) & 0xFFFFFFFFFFFFFFFF
    with psycopg_connect(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchall()
    return [row[0] for row in rows]


def nodes_on(
    serve: Callable[..., RunningService], tmp_path: Path, pg_url: str, inbox: Path
) -> Callable[[str], RunningService]:
    """Starts API nodes on one database and one inbox folder, each with its own data dir."""

    def node(name: str) -> RunningService:
        settings = make_settings(
            tmp_path / name, database_url=pg_url, inbox=inbox, inbox_settle_seconds=0.3
        )
        return serve(settings)

    return node


def test_a_standby_node_takes_over_when_the_watching_node_stops(
    serve: Callable[..., RunningService], tmp_path: Path, pg_url: str
) -> None:
    inbox = tmp_path / "inbox"
    node = nodes_on(serve, tmp_path, pg_url, inbox)

    first, second = node("a"), node("b")
    assert inbox_status(first)["enabled"] is True
    assert inbox_status(second) == {"enabled": False, "standby": True}  # serving, not watching
    first.stop()
    until(lambda: inbox_status(second)["enabled"], what="the standby node watching")
    assert inbox_status(second)["path"] == str(inbox.resolve())
    (inbox / "after.jpg").write_bytes(make_image(41, 41))
    (job,) = until(lambda: inbox_jobs(second), what="a job from the dropped file")
    assert job["source_path"] == "after.jpg"
    assert len(lock_holders(pg_url, inbox)) == 1


def test_a_watching_node_takes_its_lost_lock_again_and_keeps_watching(
    serve: Callable[..., RunningService], tmp_path: Path, pg_url: str
) -> None:
    inbox = tmp_path / "inbox"
    node = nodes_on(serve, tmp_path, pg_url, inbox)

    first = node("a")
    watcher = first.services.inbox
    assert watcher is not None
    (before,) = lock_holders(pg_url, inbox)
    with psycopg_connect(pg_url) as conn:  # what a database restart does to the lock
        assert conn.execute("SELECT pg_terminate_backend(%s)", (before,)).fetchone()[0]
    retaken = until(
        lambda: [pid for pid in lock_holders(pg_url, inbox) if pid != before],
        what="the inbox lock taken again",
    )
    assert len(retaken) == 1
    assert first.services.inbox is watcher  # the same watcher went on watching
    later = node("c")
    assert later.services.inbox is None
    assert inbox_status(later) == {"enabled": False, "standby": True}
    (inbox / "still.jpg").write_bytes(make_image(43, 43))
    (job,) = until(lambda: inbox_jobs(first), what="a job from the dropped file")
    assert job["source_path"] == "still.jpg"
    time.sleep(1.0)  # several checks of the later node: it must not take the inbox
    assert later.services.inbox is None and lock_holders(pg_url, inbox) == retaken
