"""`aip db copy --to`: a data directory the real app filled on SQLite, copied into PostgreSQL,
reads back the same through the real app; an interrupted copy finishes on a second run; a
copy that differs from its source fails verification."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.cli.commands import run
from service.config import Settings
from service.store import copy
from service.store.postgres.connection import PgConnection
from tests.conftest import RunningService, make_image, make_settings

Serve = Callable[..., RunningService]
HOOK = "http://127.0.0.1:9/hook"  # nothing listens: deliveries stay pending, then fail


def _wait_for(check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found


def make_source(serve: Serve, tmp_path: Path) -> tuple[Settings, dict[int, Any], str]:
    """A data directory with jobs that succeeded (with detections, a follow-up, a redacted
    copy), one that failed, an inbox job, a profile and webhook deliveries; the jobs' views
    and the history export as the SQLite store gives them."""
    settings = make_settings(tmp_path / "src", webhook_retry_base_seconds=3600.0)
    # A job whose stored input is gone before it runs fails (input_missing).
    idle = serve(settings.replace(worker_profiles=("nobody",)))
    doomed = idle.submit(make_image(30, 30), queries="person").json()["id"]
    idle.stop()
    for file in (settings.data_dir / "images").rglob("*.jpg"):
        file.unlink()

    service = serve(settings)
    assert service.wait(doomed)["status"] == "failed"
    put = service.client.put(
        "/v1/profiles/roofs", json={"params": {"queries": ["roof"], "prompt": "Any damage?"}}
    )
    assert put.status_code in (200, 201), put.text
    plain = service.submit(make_image(64, 48), queries="person, vehicle", webhook=HOOK)
    hidden = service.submit(make_image(48, 64), queries="person", redact="person")
    profiled = service.submit(make_image(50, 50), profile="roofs")
    ids = [doomed] + [r.json()["id"] for r in (plain, hidden, profiled)]
    for job_id in ids:
        assert service.wait(job_id)["status"] in ("succeeded", "failed")
    asked = service.client.post(f"/v1/jobs/{ids[1]}/ask?wait=60", json={"question": "Why?"})
    assert asked.status_code == 200 and asked.json()["status"] == "succeeded", asked.text
    (settings.inbox_dir / "drop.png").write_bytes(make_image(44, 44, fmt="PNG"))
    dropped = _wait_for(
        lambda: [j for j in service.client.get("/v1/jobs").json()["jobs"] if j["id"] not in ids]
    )
    ids.append(dropped[0]["id"])
    assert service.wait(ids[-1])["status"] == "succeeded"
    views = {job_id: service.client.get(f"/v1/jobs/{job_id}").json() for job_id in ids}
    assert sum(len(v["result"]["detections"]) for v in views.values() if v["result"]) >= 3
    export = service.client.get("/v1/exports/jobs.jsonl").text
    service.stop()
    return settings, views, export


def aip(*args: str) -> int:
    return run(list(args))


def pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    db = PgConnection(url)
    try:
        return [tuple(row) for row in db.execute(sql).fetchall()]
    finally:
        db.close()


def test_a_copied_data_dir_reads_back_the_same_on_postgresql(
    serve: Serve, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, views, export = make_source(serve, tmp_path)
    assert aip("db", "copy", "--to", pg_url, "--data-dir", str(settings.data_dir)) == 0
    out = capsys.readouterr().out
    for table in ("images", "jobs", "results", "detections", "followups", "inbox_files"):
        assert f"{table}: " in out  # a progress line per table
    assert "rows differ" not in out and "not in the data directory" in out  # the failed job's

    copied = serve(
        make_settings(tmp_path / "dst", database_url=pg_url, worker_profiles=("nobody",))
    )
    for job_id, view in views.items():
        assert copied.client.get(f"/v1/jobs/{job_id}").json() == view
    assert copied.client.get("/v1/exports/jobs.jsonl").text == export
    hidden = next(v for v in views.values() if v["params"].get("redact"))
    served = copied.client.get(f"/v1/jobs/{hidden['id']}/image")
    assert served.status_code == 200
    assert served.content == (settings.data_dir / f"redacted/{hidden['id']}.jpg").read_bytes()

    # Reasoning landed after its job and is searchable all the same; ids go on from the copy.
    reasoning = pg_rows(
        pg_url,
        "SELECT count(*) FROM results JOIN job_search USING (job_id)"
        " WHERE job_search.reasoning = results.reasoning AND results.reasoning != ''"
        " AND tsvector_to_array(to_tsvector('simple', results.reasoning))"
        " <@ tsvector_to_array(job_search.document)",
    )
    assert reasoning == pg_rows(pg_url, "SELECT count(*) FROM results WHERE reasoning != ''")
    new = copied.submit(make_image(33, 33)).json()["id"]
    assert new == max(views) + 1


def test_an_interrupted_copy_finishes_when_run_again(
    serve: Serve,
    tmp_path: Path,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, views, _export = make_source(serve, tmp_path)
    monkeypatch.setattr(copy, "BATCH", 2)

    def fail_after_first_batch(table: str, rows: int) -> None:
        if table == "jobs":
            raise ConnectionError("the network went away")

    with pytest.raises(ConnectionError):
        copy.copy_data_dir(
            settings.database, settings.data_dir, pg_url, after_batch=fail_after_first_batch
        )
    assert pg_rows(pg_url, "SELECT count(*) FROM jobs") == [(2,)]  # one batch landed
    assert pg_rows(pg_url, "SELECT count(*) FROM results") == [(0,)]

    report = copy.copy_data_dir(settings.database, settings.data_dir, pg_url)
    assert report.ok, copy.summary(report)
    assert {t.name: t.target_rows for t in report.tables}["jobs"] == len(views)
    assert report.files >= 4 and not report.bad_files


def test_a_copy_that_differs_from_its_source_fails_verification(
    serve: Serve, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _views, _export = make_source(serve, tmp_path)
    data_dir = str(settings.data_dir)
    assert aip("db", "copy", "--to", pg_url, "--data-dir", data_dir) == 0
    db = PgConnection(pg_url)
    try:
        db.execute("UPDATE detections SET x1 = x1 + 1e-9 WHERE idx = 1 AND job_id = 2")
        db.execute("UPDATE stored_files SET data = data || '\\x00'::bytea WHERE path LIKE 'red%'")
    finally:
        db.close()
    capsys.readouterr()
    assert aip("db", "copy", "--to", pg_url, "--data-dir", data_dir) == 1
    captured = capsys.readouterr()
    detections = next(line for line in captured.out.splitlines() if line.startswith("detect"))
    assert detections.endswith("rows differ")
    assert "differs: redacted/" in captured.out
    assert "does not match" in captured.err


def test_the_copy_refuses_a_data_dir_in_use(
    serve: Serve, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path)
    serve(settings)
    assert aip("db", "copy", "--to", pg_url, "--data-dir", str(settings.data_dir)) == 2
    assert "already using the data directory" in capsys.readouterr().err
    assert pg_rows(pg_url, "SELECT count(*) FROM jobs") == [(0,)]
