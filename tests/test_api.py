"""The real app over HTTP (uvicorn on 127.0.0.1) with real tiny checkpoints through mlx-vlm."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.config import Settings
from service.detection import Detection
from service.store.reads import Reads
from service.worker import Worker
from tests.conftest import RunningService, gate_detector, make_image, make_settings

Serve = Callable[..., RunningService]


def test_submit_poll_succeeds_with_detections_reasoning_timings_and_models(
    tmp_path: Path, serve: Serve, database_url: str | None
) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    service = serve(settings)
    response = service.submit(make_image(320, 240), queries="car, person", prompt="What is here?")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")
    assert job["params"] == {
        "queries": ["car", "person"],
        "prompt": "What is here?",
        "options": {},
        "detect_max_tokens": settings.detect_max_tokens,  # the settings: defaults and ceilings
        "reason_max_tokens": settings.reason_max_tokens,
        # The aerial options' defaults: tiles when needed, nothing redacted, nothing planned.
        "tiling": "auto",
        "set_of_marks": False,
        "redact": [],
        "keep_original": True,
        "plan": False,
    }

    done = service.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["error"] is None
    assert done["input"]["width"] == 320 and done["input"]["height"] == 240
    assert len(done["input"]["sha256"]) == 64
    result = done["result"]
    assert isinstance(result["reasoning"], str)
    for number, detection in enumerate(result["detections"], start=1):
        assert detection["number"] == number and detection["label"] in ("car", "person")
        x1, y1, x2, y2 = detection["box"]
        assert 0 <= x1 <= x2 <= 320 and 0 <= y1 <= y2 <= 240
    assert set(done["timings_ms"]) >= {"queue_wait", "decode", "detect", "reason", "persist"}
    assert all(v >= 0 for v in done["timings_ms"].values())
    models = done["models"]
    assert set(models) == {"detector", "reasoner"}
    assert all(len(m["revision"]) == 12 for m in models.values())
    stored = service.client.get(f"/v1/jobs/{job['id']}/image")
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/jpeg"
    assert Image.open(__import__("io").BytesIO(stored.content)).size == (320, 240)


def test_result_survives_a_restart_on_the_same_data_dir(settings: Settings, serve: Serve) -> None:
    first = serve(settings)
    job_id = first.submit(queries="roof").json()["id"]
    before = first.wait(job_id)
    assert before["status"] == "succeeded"
    first.stop()

    second = serve(settings)
    after = second.client.get(f"/v1/jobs/{job_id}").json()
    assert after["status"] == "succeeded"
    assert after["result"] == before["result"]
    assert after["timings_ms"] == before["timings_ms"]
    assert second.client.get(f"/v1/jobs/{job_id}/image").status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"image": b""}, 422, "empty_image"),
        ({"image": b"plain text, not a picture"}, 415, "not_an_image"),
        ({"image": make_image(300, 300)[:500]}, 422, "corrupt_image"),
        ({"prompt": "x" * 5000}, 422, "invalid_prompt"),
        ({"queries": ",".join(f"q{i}" for i in range(40))}, 422, "invalid_queries"),
        ({"surprise": "field"}, 422, "unknown_fields"),
        ({"max_attempts": "0"}, 422, "invalid_option"),
    ],
    ids=[
        "empty",
        "text",
        "truncated",
        "long-prompt",
        "many-queries",
        "unknown-field",
        "bad-attempts",
    ],
)
def test_bad_uploads_get_4xx_and_queue_nothing(
    settings: Settings, serve: Serve, kwargs: dict[str, Any], status: int, code: str
) -> None:
    service = serve(settings)
    image = kwargs.pop("image", None)
    files = {"image": ("x.jpg", image if image is not None else make_image(), "image/jpeg")}
    response = service.client.post("/v1/jobs", files=files, data=kwargs)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and response.json()["message"]
    assert service.client.get("/v1/jobs").json()["jobs"] == []
    assert list((settings.data_dir / "images").glob("*/*")) == []


def test_requests_that_are_not_uploads_get_clear_errors(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    missing = service.client.post("/v1/jobs", data={"prompt": "hi"})
    assert missing.status_code == 422 and missing.json()["code"] == "missing_image"
    wrong = service.client.post("/v1/jobs", content=b"raw", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415
    unknown = service.client.get("/v1/jobs/999")
    assert unknown.status_code == 404 and unknown.json()["code"] == "job_not_found"
    bad_filter = service.client.get("/v1/jobs", params={"status": "bogus"})
    assert bad_filter.status_code == 422 and bad_filter.json()["code"] == "invalid_filter"
    not_int = service.client.get("/v1/jobs/abc")
    assert not_int.status_code == 422 and not_int.json()["code"] == "invalid_request"


def test_oversized_upload_is_refused_with_413(tmp_path: Path, serve: Serve) -> None:
    settings = make_settings(tmp_path, max_upload_bytes=20_000)
    service = serve(settings)
    response = service.submit(make_image(1200, 1200, quality=100))
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    # Every refusal names the configured limit and its setting, not the body's slack.
    message = response.json()["message"]
    assert "20,000 bytes" in message and "AIP_MAX_UPLOAD_BYTES" in message, message

    def chunks() -> Any:  # no Content-Length: the limit is enforced while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(100):
            yield b"\0" * 65536

    streamed = service.client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert streamed.status_code == 413
    assert "20,000 bytes" in streamed.json()["message"]
    assert "AIP_MAX_UPLOAD_BYTES" in streamed.json()["message"]
    # Over the limit by less than the multipart slack: refused by the upload check itself.
    small = make_settings(tmp_path / "b", max_upload_bytes=2_000)
    near = serve(small).submit(make_image(200, 200, quality=100))
    assert near.status_code == 413 and "2,000 bytes" in near.json()["message"], near.text
    assert service.client.get("/v1/jobs").json()["jobs"] == []


def test_a_model_that_raises_fails_the_job_with_the_reason_and_the_next_succeeds(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    state = service.services.host.roles["detector"]
    real = state.runtime

    class Exploding:
        def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
            if query == "explode":
                raise RuntimeError("kernel launch failed on the accelerator")
            return list(real.detect(image, query, **kw))

    monkeypatch.setattr(state, "runtime", Exploding())
    bad = service.submit(queries="explode", max_attempts="1").json()
    good = service.submit(queries="car").json()
    failed = service.wait(bad["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "model_error"
    assert "kernel launch failed" in failed["error"]["message"]
    assert failed["attempt_history"][0]["error"]["code"] == "model_error"
    assert service.wait(good["id"])["status"] == "succeeded"


def test_health_answers_while_a_job_is_inside_inference(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    job = service.submit(queries="car").json()
    try:
        assert gate.inside.wait(timeout=60), "the worker never reached inference"
        health = service.client.get("/v1/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok" and body["worker"]["current_job"] == job["id"]
        assert body["queue"]["running"] == 1
        assert {m["role"]: m["state"] for m in body["models"]} == {
            "detector": "loaded",
            "reasoner": "loaded",
        }
        assert service.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    finally:
        gate.release.set()
    assert service.wait(job["id"])["status"] == "succeeded"


def test_health_is_503_while_models_load(
    tmp_path: Path, serve: Serve, tiny_checkpoints: tuple[Path, Path]
) -> None:
    from service.models.host import ModelHost

    gate = threading.Event()
    detector, reasoner = tiny_checkpoints

    def slow_loader(path: Path) -> Any:
        gate.wait(timeout=60)
        return object()

    host = ModelHost(
        {"detector": str(detector), "reasoner": str(reasoner)},
        loaders={"detector": slow_loader, "reasoner": slow_loader},
    )
    service = serve(make_settings(tmp_path), host=host)
    try:
        loading = service.client.get("/v1/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        accepted = service.submit()  # jobs are accepted while models load
        assert accepted.status_code == 202
    finally:
        gate.set()


def test_cancel_a_queued_job_and_409_for_a_finished_one(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    running = service.submit(queries="car").json()
    assert gate.inside.wait(timeout=60)
    queued = service.submit(queries="car").json()
    cancelled = service.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    gate.release.set()
    assert service.wait(running["id"])["status"] == "succeeded"
    again = service.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert again.status_code == 409 and again.json()["code"] == "job_finished"
    assert service.client.get(f"/v1/jobs/{queued['id']}").json()["result"] is None


def test_list_is_newest_first_filtered_and_paged(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)  # the first job runs, the rest stay queued
    ids = [service.submit(make_image(32 + i, 32)).json()["id"] for i in range(5)]
    service.client.post(f"/v1/jobs/{ids[1]}/cancel")
    page1 = service.client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page1["jobs"]] == ids[::-1][:2]
    late = service.submit(make_image(99, 32)).json()["id"]  # arrives while paging
    page2 = service.client.get("/v1/jobs", params={"limit": 2, "cursor": page1["next_cursor"]})
    page3 = service.client.get(
        "/v1/jobs", params={"limit": 2, "cursor": page2.json()["next_cursor"]}
    )
    seen = [j["id"] for p in (page1, page2.json(), page3.json()) for j in p["jobs"]]
    assert seen == ids[::-1] and late not in seen
    assert page3.json()["next_cursor"] is None
    cancelled = service.client.get("/v1/jobs", params={"status": "cancelled"}).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    gate.release.set()


def test_path_submission_inside_allowed_folder_only(tmp_path: Path, serve: Serve) -> None:
    allowed = tmp_path / "drops"
    allowed.mkdir()
    (allowed / "frame.png").write_bytes(make_image(50, 40, fmt="PNG"))
    (tmp_path / "private.png").write_bytes(make_image(50, 40, fmt="PNG"))
    service = serve(make_settings(tmp_path, allowed_dirs=(allowed,)))
    ok = service.client.post(
        "/v1/jobs", json={"path": str(allowed / "frame.png"), "queries": ["car"]}
    )
    assert ok.status_code == 202, ok.text
    assert ok.json()["source"] == "path" and ok.json()["input"]["format"] == "PNG"
    for escape in (str(allowed / ".." / "private.png"), str(tmp_path / "private.png")):
        refused = service.client.post("/v1/jobs", json={"path": escape})
        assert refused.status_code == 403 and refused.json()["code"] == "path_not_allowed"
    assert service.wait(ok.json()["id"])["status"] == "succeeded"


def test_database_lives_in_the_data_dir_with_wal(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    service.wait(service.submit().json()["id"])
    db = settings.data_dir / "aip.db"
    assert db.is_file()
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


JOB_ROUTES = [
    ("GET", "/v1/jobs/{}"),
    ("GET", "/v1/jobs/{}/image"),
    ("GET", "/v1/jobs/{}/annotated"),
    ("POST", "/v1/jobs/{}/cancel"),
    ("POST", "/v1/jobs/{}/retry"),
]


def test_job_ids_sqlite_cannot_hold_are_4xx_on_every_job_route(
    settings: Settings, serve: Serve
) -> None:
    service = serve(settings)
    for method, route in JOB_ROUTES:
        for job_id in (2**63, 2**64, 10**30, -1, 0, "1e3", "x"):
            response = service.client.request(method, route.format(job_id))
            assert response.status_code in (404, 422), (method, route, job_id, response.text)
            body = response.json()
            assert body["code"] and body["message"], body
        largest = service.client.request(method, route.format(2**63 - 1))
        assert largest.status_code == 404 and largest.json()["code"] == "job_not_found"


def test_lone_surrogates_in_a_json_body_or_path_are_422(tmp_path: Path, serve: Serve) -> None:
    allowed = tmp_path / "drops"
    allowed.mkdir()
    (allowed / "frame.png").write_bytes(make_image(50, 40, fmt="PNG"))
    service = serve(make_settings(tmp_path, allowed_dirs=(allowed,)))
    good = str(allowed / "frame.png")
    for body in (
        {"path": "\ud800"},
        {"path": f"{allowed}/\udfff.png"},
        {"path": good, "prompt": "why \ud800"},
        {"path": good, "queries": ["car", "\udc00"]},
        {"path": good, "\ud800": 1},
    ):
        # json.dumps writes a lone surrogate as the escape `\ud800`, as a client would.
        raw = json.dumps(body).encode()
        response = service.client.post(
            "/v1/jobs", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, (body, response.text)
        assert response.json()["code"] == "invalid_text", response.text
    # JSON that parses into trouble: recursion past the parser's limit, a 5000-digit number.
    for raw in (b"[" * 5000, b'{"path": "x", "max_attempts": ' + b"9" * 5000 + b"}"):
        response = service.client.post(
            "/v1/jobs", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422 and response.json()["code"] == "invalid_json"
    # A multipart field cannot carry one: invalid UTF-8 arrives as Latin-1 text, never a 500.
    form = service.client.post(
        "/v1/jobs",
        files={"image": ("a.jpg", make_image(40, 40), "image/jpeg")},
        data={"prompt": "\ud800".encode("utf-8", "surrogatepass")},
    )
    assert form.status_code in (202, 422), form.text
    jobs = service.client.get("/v1/jobs").json()["jobs"]
    assert len(jobs) == (1 if form.status_code == 202 else 0)
    # A model name with one is refused before the model host sees it.
    load = service.client.post(
        "/v1/models/detector/load",
        content=b'{"model": "\\ud800"}',
        headers={"content-type": "application/json"},
    )
    assert load.status_code == 422 and load.json()["code"] == "invalid_text"
    assert service.services.host.roles["detector"].state == "loaded"


def test_an_internal_error_names_an_id_never_the_exception(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("near SELECT secret FROM jobs: syntax error")

    monkeypatch.setattr(service.services.reads, "page", broken)
    response = service.client.get("/v1/jobs")
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal_error"
    assert body["message"].startswith("internal error; see the service log (error id ")
    assert "SELECT" not in response.text and "OperationalError" not in response.text


def test_submit_answers_202_with_the_id_even_if_reading_it_back_fails(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    real = service.services.reads.job

    async def broken(job_id: int) -> Any:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(service.services.reads, "job", broken)
    response = service.submit(make_image(40, 40))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    monkeypatch.setattr(service.services.reads, "job", real)
    db = sqlite3.connect(settings.database)
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_the_202_body_is_one_snapshot(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Worker, "start", lambda self: None)  # only this test claims jobs
    service = serve(settings)
    queue = service.services.queue
    read_row = Reads._job_and_image

    async def row_then_claim(session: Any, job_id: int) -> Any:
        row = await read_row(session, job_id)
        # A worker's claim commits between reading the job row and reading its attempts.
        assert await queue.claim("another-worker", 60) is not None
        return row

    monkeypatch.setattr(Reads, "_job_and_image", staticmethod(row_then_claim))
    response = service.submit(make_image(40, 40))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["attempts"] == 0, body
    assert body["attempt_history"] == [], body
    monkeypatch.setattr(Reads, "_job_and_image", staticmethod(read_row))
    now = service.client.get(f"/v1/jobs/{body['id']}").json()
    assert now["status"] == "running" and now["attempts"] == 1, now
    assert [a["attempt"] for a in now["attempt_history"]] == [1]


def test_attempt_numbers_keep_rising_across_retries_and_queue_wait_restarts(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    state = service.services.host.roles["detector"]
    real = state.runtime

    class Broken:
        def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
            raise RuntimeError("broken")

    monkeypatch.setattr(state, "runtime", Broken())
    job_id = service.submit(make_image(40, 40), max_attempts="1").json()["id"]
    assert service.wait(job_id)["status"] == "failed"
    retried = service.client.post(f"/v1/jobs/{job_id}/retry")
    # Queued again; the woken worker may already have claimed it by the time the view is read.
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] in ("queued", "running"), retried.text
    second = service.wait(job_id)
    assert second["status"] == "failed" and second["attempts"] == 2, second
    assert second["max_attempts"] == 2  # one more attempt per retry, as submitted
    # Make the job an hour old: the next run's queue wait must count from its retry.
    db = sqlite3.connect(settings.database)
    db.execute("UPDATE jobs SET created_at = created_at - 3600 WHERE id = ?", (job_id,))
    db.commit()
    db.close()
    monkeypatch.setattr(state, "runtime", real)
    assert service.client.post(f"/v1/jobs/{job_id}/retry").status_code == 202
    done = service.wait(job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 3, done
    history = done["attempt_history"]
    assert [a["attempt"] for a in history] == [1, 2, 3]
    assert [a["outcome"] for a in history] == ["failed", "failed", "succeeded"]
    assert done["timings_ms"]["queue_wait"] < 600_000, done["timings_ms"]
    assert done["result"] is not None
    refused = service.client.post(f"/v1/jobs/{job_id}/retry")  # succeeded: nothing to retry
    assert refused.status_code == 409 and refused.json()["code"] == "job_not_retryable"


# The only response values left open on purpose: whatever the camera wrote, the model options,
# a mask's run lengths and a user's JSON Schema. Every other object in a response is closed
# and typed.
OPEN_MAPS = {
    ("JobInput", "exif"),
    ("JobParams", "options"),
    ("JobParams", "response_schema"),
    ("ProfileParams", "response_schema"),
    ("Detection", "mask"),
}


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[-1]} if "$ref" in node else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def test_openapi_types_every_response_closed_and_lists_each_error_status(
    settings: Settings, serve: Serve
) -> None:
    document = serve(settings).client.get("/openapi.json").json()
    components = document["components"]["schemas"]
    reachable: set[str] = set()
    todo = set().union(
        *(_refs(op["responses"]) for ops in document["paths"].values() for op in ops.values())
    )
    while todo:
        name = todo.pop()
        reachable.add(name)
        todo |= _refs(components[name]) - reachable
    assert {"Job", "JobPage", "Stats", "ModelsReport", "InboxStatus", "Health"} <= reachable
    for name in reachable:
        schema = components[name]
        assert schema.get("additionalProperties") is False, f"{name} is an open object"
        for key, value in schema["properties"].items():
            for branch in value.get("anyOf", [value]):
                if branch.get("type") == "object" and "$ref" not in branch:
                    untyped = branch.get("additionalProperties", True) in (True, {})
                    assert not untyped or (name, key) in OPEN_MAPS, f"{name}.{key} is untyped"
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            listed = set(op["responses"])
            where = f"{method.upper()} {path}"
            assert "403" in listed, where  # the Host/Origin guard runs before every route
            assert ("401" in listed) == bool(op.get("security")), where
            if op.get("parameters") or op.get("requestBody"):
                assert "422" in listed, where
            if method == "post":
                assert "413" in listed, where  # the body limit runs before every POST
            for status, response in op["responses"].items():
                for media, content in response.get("content", {}).items():
                    if media == "application/json" and "schema" not in content:
                        assert path == "/v1/exports/jobs.{fmt}", where  # COCO, a file format
                    elif media == "application/json":
                        assert "$ref" in content["schema"], (where, status)
                        # Health's 503 is its own body (loading, failed); others: {code, message}
                        if status >= "400" and (path, status) != ("/v1/health", "503"):
                            assert content["schema"]["$ref"].endswith("/ErrorBody"), where
