"""Never lose a job: shutdown mid-job, retries, cancellation, timeouts, idempotency, auth."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.cli import main
from service.config import Settings
from service.detection import Detection
from tests.conftest import RunningService, gate_detector, make_image, make_settings

Serve = Callable[..., RunningService]


def test_shutdown_mid_job_releases_it_and_the_next_start_finishes_it(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, shutdown_grace_seconds=0.2)
    first = serve(settings)
    gate = gate_detector(first, monkeypatch)
    job_id = first.submit(queries="car").json()["id"]
    assert gate.inside.wait(timeout=60)
    first.stop()  # grace runs out while the model is still inside inference
    gate.release.set()
    monkeypatch.undo()

    second = serve(settings)
    done = second.wait(job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 1  # a release costs no attempt
    outcomes = [a["outcome"] for a in done["attempt_history"]]
    assert outcomes == ["released", "succeeded"]


def test_shutdown_within_grace_lets_the_job_finish(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, shutdown_grace_seconds=60)
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    job_id = service.submit(queries="car").json()["id"]
    assert gate.inside.wait(timeout=60)
    stopper = threading.Thread(target=service.stop)
    stopper.start()
    gate.release.set()
    stopper.join(timeout=120)
    monkeypatch.undo()
    again = serve(settings)
    done = again.client.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "succeeded"
    assert [a["outcome"] for a in done["attempt_history"]] == ["succeeded"]


def test_a_transient_error_retries_and_then_succeeds(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(make_settings(tmp_path, retry_base_seconds=0.05))
    state = service.services.host.roles["detector"]
    real, calls = state.runtime, []

    class FlakyOnce:
        def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
            calls.append(query)
            if len(calls) == 1:
                raise MemoryError()
            return list(real.detect(image, query, **kw))

    monkeypatch.setattr(state, "runtime", FlakyOnce())
    done = service.wait(service.submit(queries="car").json()["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    history = done["attempt_history"]
    assert [a["outcome"] for a in history] == ["retrying", "succeeded"]
    assert history[0]["error"]["code"] == "out_of_memory"


def test_a_permanent_error_does_not_retry(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    service.submit(make_image(10, 10))  # holds the worker while the next input disappears
    assert gate.inside.wait(timeout=60)
    job = service.submit(make_image(20, 20)).json()
    sha = job["input"]["sha256"]
    (settings.data_dir / "images" / sha[:2] / f"{sha}.jpg").unlink()
    gate.release.set()
    done = service.wait(job["id"])
    assert done["status"] == "failed" and done["attempts"] == 1
    assert done["error"]["code"] == "input_missing"


def test_cancel_a_running_job_stops_it_at_the_next_stage(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    job_id = service.submit(queries="car, person").json()["id"]
    assert gate.inside.wait(timeout=60)
    response = service.client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"]
    gate.release.set()
    done = service.wait(job_id)
    assert done["status"] == "cancelled" and done["result"] is None
    assert "before detect:person" in done["error"]["message"]
    follow = service.wait(service.submit(queries="car").json()["id"])
    assert follow["status"] == "succeeded"  # the worker was freed


def test_a_job_over_its_timeout_fails_with_the_reason(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, job_timeout_seconds=0.3, lease_seconds=0.3)
    service = serve(settings)
    worker = service.services.worker
    # Hold inference until the worker has decided the job is over time (no wall-clock race).
    gate_detector(service, monkeypatch, hold=lambda: worker._stop_flag.wait(timeout=60))
    done = service.wait(service.submit(queries="car").json()["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "timeout"
    assert "timed out after 0.3 s" in done["error"]["message"]
    assert done["attempts"] == 1


def test_retry_endpoint_requeues_a_failed_job(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    state = service.services.host.roles["detector"]
    real = state.runtime

    class Broken:
        def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
            raise RuntimeError("broken")

    monkeypatch.setattr(state, "runtime", Broken())
    job_id = service.submit(max_attempts="1").json()["id"]
    assert service.wait(job_id)["status"] == "failed"
    monkeypatch.setattr(state, "runtime", real)
    retried = service.client.post(f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 202
    done = service.wait(job_id)
    assert done["status"] == "succeeded" and done["result"] is not None
    assert service.client.post(f"/v1/jobs/{job_id}/retry").status_code == 409


def test_idempotency_key_returns_the_original_job(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    image = make_image(90, 60)
    headers = {"Idempotency-Key": "upload-42"}
    files = {"image": ("a.jpg", image, "image/jpeg")}
    first = service.client.post("/v1/jobs", files=files, data={"queries": "car"}, headers=headers)
    again = service.client.post("/v1/jobs", files=files, data={"queries": "car"}, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    changed = service.client.post(
        "/v1/jobs", files=files, data={"queries": "boat"}, headers=headers
    )
    assert changed.status_code == 409 and changed.json()["code"] == "idempotency_conflict"
    assert len(service.client.get("/v1/jobs").json()["jobs"]) == 1


def test_with_a_token_every_route_but_health_needs_it(tmp_path: Path, serve: Serve) -> None:
    service = serve(make_settings(tmp_path, token="s3cret"))
    anonymous = service.client
    anonymous.headers.pop("Authorization")
    assert anonymous.get("/v1/health").status_code == 200
    for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/jobs/1"), ("POST", "/v1/jobs")):
        response = anonymous.request(method, path)
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    wrong = anonymous.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = anonymous.get("/v1/jobs", headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200


def test_non_loopback_bind_without_token_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIP_TOKEN", raising=False)
    code = main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path), "--demo"])
    assert code == 2
    assert "without a token" in capsys.readouterr().err
    assert not (tmp_path / "aip.db").exists()


def test_decompression_bomb_upload_is_refused(tmp_path: Path, serve: Serve) -> None:
    service = serve(make_settings(tmp_path, max_pixels=1_000_000))
    response = service.submit(make_image(2000, 1000, fmt="PNG"), name="bomb.png")
    assert response.status_code == 413 and response.json()["code"] == "too_many_pixels"


def test_a_second_service_on_the_same_data_dir_is_refused(settings: Settings, serve: Serve) -> None:
    serve(settings)
    with pytest.raises(RuntimeError, match="did not start"):
        serve(settings)
