"""`aip db copy --to`: a data directory the real app filled on SQLite, copied into PostgreSQL,
reads back the same through the real app; an interrupted copy finishes on a second run; a
copy that differs from its source fails verification; a copy that cannot start says why in one
line and writes nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.cli.commands import run
from service.config import Settings
from service.store import copy
from service.store.migrate import migrate
from service.store.postgres.connection import PgConnection
from tests.conftest import RunningService, make_image, make_settings
from tests.test_postgres_app import insert_jobs

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
        " AND tsvector_to_array(to_tsvector('aip_search', results.reasoning))"
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
    err = capsys.readouterr().err
    assert f"is already using the data directory {settings.data_dir}; stop it, then copy" in err
    assert "--data-dir or AIP_DATA_DIR" not in err  # `aip serve`'s advice, not a copy's
    assert pg_rows(pg_url, "SELECT count(*) FROM jobs") == [(0,)]


def small_source(tmp_path: Path) -> Settings:
    """A data directory whose SQLite store holds one job and its stored image."""
    settings = make_settings(tmp_path / "src")
    settings.data_dir.mkdir(parents=True)
    migrate(settings.database)
    insert_jobs(settings, {1: "count the cars"})
    image = settings.data_dir / f"images/{1:064x}.jpg"
    image.parent.mkdir()
    image.write_bytes(make_image(20, 20))
    return settings


def one_line_refusal(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert aip("db", "copy", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_the_copy_refuses_a_database_other_nodes_use(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = small_source(tmp_path)
    other = make_settings(tmp_path / "other", database_url=pg_url)
    insert_jobs(other, {1: "a job of the fleet", 7: "another"})
    store = tmp_path / "share"
    store.mkdir()
    data_dir = str(settings.data_dir)
    err = one_line_refusal(
        capsys, "--to", pg_url, "--data-dir", data_dir, "--image-store", str(store)
    )
    assert "already holds 2 jobs that did not come from this data directory" in err
    assert "copy into an empty database" in err
    assert list(store.iterdir()) == []  # nothing written: no files, no rows
    assert pg_rows(pg_url, "SELECT id FROM jobs ORDER BY id") == [(1,), (7,)]
    assert pg_rows(pg_url, "SELECT count(*) FROM stored_files") == [(0,)]


def test_an_unreachable_database_is_one_line(
    tmp_path: Path, postgres: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(small_source(tmp_path).data_dir)
    for url in (postgres.url("no_such_database"), "postgresql://aip@127.0.0.1:1/aip"):
        err = one_line_refusal(capsys, "--to", url, "--data-dir", data_dir)
        assert err.startswith(f"aip: cannot reach the database {url} ("), err
        assert "run it again" not in err


def test_a_missing_image_store_is_refused_not_created(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(small_source(tmp_path).data_dir)
    store = tmp_path / "mnt/share"
    err = one_line_refusal(
        capsys, "--to", pg_url, "--data-dir", data_dir, "--image-store", str(store)
    )
    assert f"{store} does not exist (is the share mounted?)" in err
    assert not store.parent.exists()
    assert pg_rows(pg_url, "SELECT count(*) FROM jobs") == [(0,)]


def test_without_the_driver_the_copy_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    monkeypatch.delitem(sys.modules, "service.store.copy")
    err = one_line_refusal(capsys, "--to", "postgresql://aip@db/aip", "--data-dir", "x")
    assert err == (
        "aip: PostgreSQL needs its driver: pip install 'aerial-intelligence-pipeline[postgres]'\n"
    )
