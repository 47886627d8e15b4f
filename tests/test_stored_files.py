"""Stored files on a shared PostgreSQL store: a node reads the images and redacted copies other
nodes stored, from the database or from a folder every node mounts (real app, real server)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.store.postgres.connection import PgConnection
from tests.conftest import RunningService, make_image, make_settings

Serve = Callable[..., RunningService]
NOBODY = ("nobody",)  # a profile no job has: a node that serves the API and runs nothing


def rows(url: str, sql: str, *args: Any) -> list[Any]:
    db = PgConnection(url)
    try:
        return [tuple(row) for row in db.execute(sql, args).fetchall()]
    finally:
        db.close()


def image_path(url: str, job_id: int) -> str:
    ((path,),) = rows(
        url,
        "SELECT images.path FROM jobs JOIN images ON images.sha256 = jobs.image_sha256"
        " WHERE jobs.id = ?",
        job_id,
    )
    return str(path)


def test_a_worker_with_an_empty_data_dir_runs_a_job_another_node_took_in(
    serve: Serve, tmp_path: Path, pg_url: str
) -> None:
    image = make_image(64, 48)
    api = serve(make_settings(tmp_path / "a", database_url=pg_url, worker_profiles=NOBODY))
    job_id = api.submit(image, queries="person", redact="person").json()["id"]
    worker_dir = tmp_path / "b" / "data"
    assert not worker_dir.exists()
    serve(make_settings(tmp_path / "b", database_url=pg_url))
    job = api.wait(job_id)
    assert job["status"] == "succeeded", job

    path = image_path(pg_url, job_id)
    assert (worker_dir / path).read_bytes() == image  # fetched from the database
    copy = f"redacted/{job_id}.jpg"
    assert (worker_dir / copy).is_file() and not (tmp_path / "a" / "data" / copy).exists()
    stored = rows(pg_url, "SELECT path, bytes FROM stored_files ORDER BY path")
    assert stored == [(path, len(image)), (copy, (worker_dir / copy).stat().st_size)]

    # The API node hands out the copy the worker wrote, and draws on it.
    served = api.client.get(f"/v1/jobs/{job_id}/image")
    assert served.status_code == 200, served.text
    assert served.content == (worker_dir / copy).read_bytes()
    drawn = api.client.get(f"/v1/jobs/{job_id}/annotated")
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/jpeg"

    # The same job on one SQLite node: the same result.
    alone = serve(make_settings(tmp_path / "c"))
    same = alone.wait(alone.submit(image, queries="person", redact="person").json()["id"])
    assert same["result"]["detections"] == job["result"]["detections"]
    assert same["result"]["reasoning"] == job["result"]["reasoning"]


def test_the_same_bytes_twice_are_stored_once(serve: Serve, tmp_path: Path, pg_url: str) -> None:
    api = serve(make_settings(tmp_path, database_url=pg_url, worker_profiles=NOBODY))
    image = make_image(40, 30)
    first = api.submit(image, queries="person").json()["id"]
    second = api.submit(image, queries="vehicle").json()["id"]
    assert image_path(pg_url, first) == image_path(pg_url, second)
    assert rows(pg_url, "SELECT count(*) FROM stored_files") == [(1,)]


def test_nodes_sharing_an_image_store_keep_files_out_of_the_database(
    serve: Serve, tmp_path: Path, pg_url: str
) -> None:
    shared = tmp_path / "shared"  # the share every node mounts
    shared.mkdir()
    image = make_image(56, 40)
    api = serve(
        make_settings(
            tmp_path / "a", database_url=pg_url, image_store=shared, worker_profiles=NOBODY
        )
    )
    job_id = api.submit(image, queries="person", redact="person").json()["id"]
    serve(make_settings(tmp_path / "b", database_url=pg_url, image_store=shared))
    job = api.wait(job_id)
    assert job["status"] == "succeeded", job

    assert (shared / image_path(pg_url, job_id)).read_bytes() == image
    copy = shared / f"redacted/{job_id}.jpg"
    assert copy.is_file()
    assert rows(pg_url, "SELECT count(*) FROM stored_files") == [(0,)]
    for node in ("a", "b"):
        data_dir = tmp_path / node / "data"
        assert not (data_dir / "images").exists() or not any((data_dir / "images").rglob("*.*"))
        assert not (data_dir / "redacted").exists()
    served = api.client.get(f"/v1/jobs/{job_id}/image")
    assert served.status_code == 200 and served.content == copy.read_bytes()


def test_an_image_dropped_into_one_nodes_inbox_runs_on_another(
    serve: Serve, tmp_path: Path, pg_url: str
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    api = serve(
        make_settings(
            tmp_path / "a",
            database_url=pg_url,
            worker_profiles=NOBODY,
            inbox=inbox,
            inbox_settle_seconds=0.3,
        )
    )
    image = make_image(56, 40)
    (inbox / "field.jpg").write_bytes(image)
    deadline = time.monotonic() + 60
    while not (jobs := api.client.get("/v1/jobs", params={"source": "inbox"}).json()["jobs"]):
        assert time.monotonic() < deadline, "the inbox never took the file"
        time.sleep(0.1)
    worker_dir = tmp_path / "b" / "data"
    serve(make_settings(tmp_path / "b", database_url=pg_url))
    job = api.wait(jobs[0]["id"])
    assert job["status"] == "succeeded", job
    assert (worker_dir / image_path(pg_url, job["id"])).read_bytes() == image
