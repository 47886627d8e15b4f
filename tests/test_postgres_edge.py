"""Input and outages PostgreSQL meets differently from SQLite: text with NUL (which PostgreSQL's
text cannot hold) is refused alike on both backends, a model's NUL is stored as U+FFFD, and a
database out of reach is a 503 to retry, never a 500 (real app, real server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from service.config import Settings
from service.detection import Detection
from service.errors import StartupRefused
from service.store.backend import open_store
from service.store.postgres.queue import PgQueue
from service.store.queue import ImageRecord, Outcome
from tests.conftest import RunningService, make_image, make_settings, psycopg_connect

Serve = Callable[..., RunningService]
AIP = [sys.executable, "-m", "service.cli"]
SCHEMA = {"type": "object", "properties": {"note": {"type": "string", "description": "a\x00b"}}}


def test_text_with_a_nul_is_refused_alike_on_both_backends(
    serve: Serve, tmp_path: Path, database_url: str | None
) -> None:
    service = serve(make_settings(tmp_path, database_url=database_url))
    refused = [
        service.submit(prompt="a\x00b"),
        service.submit(queries="car,a\x00b"),
        service.client.post(  # a raw NUL in the file name (httpx would escape it)
            "/v1/jobs",
            content=b'--B\r\nContent-Disposition: form-data; name="image"; filename="a\x00b.jpg"'
            b"\r\nContent-Type: image/jpeg\r\n\r\n" + make_image() + b"\r\n--B--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=B"},
        ),
        service.submit(response_schema=json.dumps(SCHEMA)),
        service.client.get("/v1/jobs", params={"label": "a\x00b"}),
        service.client.get("/v1/jobs", params={"folder": "a\x00b"}),
        service.client.put("/v1/profiles/nul", json={"description": "a\x00b", "params": {}}),
    ]
    for response in refused:
        assert response.status_code == 422, (refused.index(response), response.text[:300])
        assert response.json()["code"] in ("invalid_text", "invalid_filter", "invalid_schema")
    assert service.client.get("/v1/jobs").json()["jobs"] == []


def test_a_nul_a_model_generated_is_stored_as_a_replacement_character(
    tmp_path: Path, pg_url: str
) -> None:
    async def scenario() -> dict[str, object]:
        queue = await PgQueue.connect(pg_url, tmp_path)
        try:
            image = ImageRecord("cd" * 32, 10, 8, 8, "PNG", "images/x.png")
            await queue.enqueue(image, {"prompt": "p"}, input_name="x.png")
            claim = await queue.claim("w", 30)
            assert claim is not None
            found = [Detection("car\x00", (1.0, 1.0, 4.0, 4.0), (8, 8))]
            outcome = Outcome(found, "left\x00right", answer={"note": "a\x00b"})
            assert await queue.complete(claim, outcome)
            row = await queue.read(
                lambda db: db.execute(
                    "SELECT reasoning, answer, label FROM results JOIN detections USING (job_id)"
                ).fetchone()
            )
            return {"reasoning": row[0], "answer": json.loads(row[1]), "label": row[2]}
        finally:
            await queue.close()

    assert asyncio.run(scenario()) == {
        "reasoning": "left\ufffdright",
        "answer": {"note": "a\ufffdb"},
        "label": "car\ufffd",
    }


def test_a_database_out_of_reach_is_a_503_to_retry_and_service_resumes(
    serve: Serve, tmp_path: Path, pg_url: str
) -> None:
    service = serve(make_settings(tmp_path, database_url=pg_url))
    job_id = service.wait(service.submit(queries="car").json()["id"])["id"]
    name = pg_url.rsplit("/", 1)[1]
    with psycopg_connect(pg_url.rsplit("/", 1)[0] + "/postgres") as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        try:
            for path in (f"/v1/jobs/{job_id}", "/v1/jobs", "/v1/stats", "/v1/nodes"):
                seen = {service.client.get(path).status_code for _ in range(2)}
                assert seen == {503}, (path, seen)
            answer = service.client.get(f"/v1/jobs/{job_id}")
            assert answer.json()["code"] == "database_unavailable"
            assert answer.headers["retry-after"] == "5"
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert service.client.get(f"/v1/jobs/{job_id}").status_code == 200
    again = service.submit(queries="car")
    assert again.status_code == 202, again.text
    assert service.wait(again.json()["id"])["status"] == "succeeded"


def test_an_image_store_that_is_not_there_refuses_to_start(tmp_path: Path, pg_url: str) -> None:
    """An unmounted share must not become a local folder that no other node sees."""
    missing = tmp_path / "nas" / "aip"
    for settings, says in (
        (make_settings(tmp_path, database_url=pg_url, image_store=missing), "is the share"),
        (make_settings(tmp_path, image_store=tmp_path), "PostgreSQL"),
    ):
        with pytest.raises(StartupRefused, match=says):
            asyncio.run(open_store(settings))
    assert not missing.exists()


def test_worker_profiles_must_be_profile_names() -> None:
    done = subprocess.run(
        [*AIP, "worker", "--database", "postgresql://x/y", "--profiles", "Survey 20MP"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "is not a profile name" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(ValueError, match="not a profile name"):
        Settings.from_env({"AIP_WORKER_PROFILES": "survey,BAD"})
    assert Settings.from_env({"AIP_WORKER_PROFILES": "survey, none"}).worker_profiles == (
        "survey",
        "none",
    )
