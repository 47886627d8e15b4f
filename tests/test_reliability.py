"""Never lose a job: shutdown mid-job, retries, cancellation, timeouts, idempotency, auth."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.cli import main
from service.config import Settings
from service.detection import Detection
from service.store.migrate import migrate
from service.store.queue import ImageRecord, Outcome, Queue
from tests.conftest import (
    RunningService,
    free_port,
    gate_detector,
    make_image,
    make_settings,
    subprocess_env,
)

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
    # A release costs no attempt (the job gets one more) and its number is never reused.
    assert done["status"] == "succeeded", done
    assert (done["attempts"], done["max_attempts"]) == (2, settings.max_attempts + 1), done
    history = [(a["attempt"], a["outcome"]) for a in done["attempt_history"]]
    assert history == [(1, "released"), (2, "succeeded")]


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


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 1.0  # every reading later than the last: arrival order is unambiguous
        return self.now


_IMAGE = ImageRecord(sha256="cd" * 32, bytes=10, width=8, height=8, format="PNG", path="x.png")


async def _crashed_queue(db: Path, clock: _Clock) -> Queue:
    """A second queue on the same file, as the next start after a crash opens it."""
    return await Queue.open(db, clock=clock)


def test_a_job_interrupted_by_a_crash_runs_next_not_last(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        db, clock = tmp_path / "aip.db", _Clock()
        migrate(db)
        before = await Queue.open(db, clock=clock)
        a, _ = await before.enqueue(_IMAGE, {}, input_name="a.png")
        assert (await before.claim("crashed-worker", 30)) is not None
        later = [(await before.enqueue(_IMAGE, {}, input_name=f"{n}.png"))[0] for n in "bcde"]
        await before.close()  # the process dies with A running
        after = await _crashed_queue(db, clock)
        assert await after.recover(expired_only=False) == (1, 0)
        order = []
        while (claim := await after.claim("next-worker", 30)) is not None:
            order.append(claim.job_id)
            await after.complete(claim, Outcome([], "done"))
        await after.close()
        return order, [a, *later]

    order, expected = asyncio.run(scenario())
    assert order == expected  # A first, then B..E in arrival order


def test_a_job_that_kills_its_worker_every_time_fails_and_lets_the_rest_run(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[list[str], int]:
        db, clock = tmp_path / "aip.db", _Clock()
        migrate(db)
        queue = await Queue.open(db, clock=clock)
        poison, _ = await queue.enqueue(_IMAGE, {}, input_name="poison.png", max_attempts=2)
        other, _ = await queue.enqueue(_IMAGE, {}, input_name="b.png")
        assert other != poison
        outcomes = []
        for _ in range(2):  # each start: the poison job is first in line and kills the worker
            claim = await queue.claim("worker", 30)
            assert claim is not None and claim.job_id == poison
            await queue.close()
            queue = await _crashed_queue(db, clock)
            requeued, failed = await queue.recover(expired_only=False)
            outcomes.append("failed" if failed else "requeued" if requeued else "?")
        claim = await queue.claim("worker", 30)
        await queue.close()
        assert claim is not None
        return outcomes, claim.job_id

    outcomes, next_job = asyncio.run(scenario())
    assert outcomes == ["requeued", "failed"]  # attempts are spent: no endless loop
    assert next_job == 2  # the other job


def test_a_job_handed_back_at_shutdown_keeps_its_place(tmp_path: Path) -> None:
    async def scenario() -> int:
        db, clock = tmp_path / "aip.db", _Clock()
        migrate(db)
        queue = await Queue.open(db, clock=clock)
        await queue.enqueue(_IMAGE, {}, input_name="a.png")
        claim = await queue.claim("worker", 30)
        assert claim is not None
        for n in "bc":
            await queue.enqueue(_IMAGE, {}, input_name=f"{n}.png")
        assert await queue.release(claim)
        again = await queue.claim("worker", 30)
        await queue.close()
        assert again is not None and (again.attempt, again.round_attempt) == (2, 1)  # none spent
        return again.job_id

    assert asyncio.run(scenario()) == 1


def _log_has(log_file: Path, text: str) -> bool:
    return log_file.exists() and text in log_file.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize(
    "upload_in_flight",
    [False, True],
    ids=["during-the-grace-wait", "while-uvicorn-waits-for-a-connection"],
)
def test_ctrl_c_waits_for_the_job_and_a_second_ctrl_c_hands_it_back(
    tmp_path: Path, tiny_checkpoints: tuple[Path, Path], upload_in_flight: bool
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = subprocess_env(
        tmp_path / "inbox", tiny_checkpoints, data_dir=data_dir, port=port, shutdown_grace=120
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--log-level", "info"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            assert process.poll() is None, "the service exited during start-up"
            assert time.monotonic() < deadline, "the service did not become healthy"
            time.sleep(0.1)
        queries = ",".join(f"object {i}" for i in range(16))  # seconds of work on one job
        files = {"image": ("f.jpg", make_image(64, 64), "image/jpeg")}
        job_id = httpx.post(f"{url}/v1/jobs", files=files, data={"queries": queries}).json()["id"]
        while httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.01)

        log_file = data_dir / "logs" / "aip.log"
        held = socket.create_connection(("127.0.0.1", port))
        if upload_in_flight:  # a body still arriving: uvicorn waits for it before shutting down
            held.sendall(
                b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
        process.send_signal(signal.SIGINT)
        waiting = f"waiting up to 120 s for job {job_id} to finish (Ctrl-C again to hand it back"
        while not _log_has(log_file, waiting):
            assert time.monotonic() < deadline, "no word on what shutdown waits for"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=60)
        held.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    assert status == 130, stderr[-3000:]  # the shell's status for an interrupted process
    assert "Traceback" not in stderr
    handed_back = f"WARNING aip.worker: job {job_id} handed back to the queue unfinished"
    assert _log_has(log_file, handed_back), stderr[-3000:]
    with contextlib.closing(sqlite3.connect(data_dir / "aip.db")) as db:
        job = db.execute(
            "SELECT status, attempts, max_attempts FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        outcomes = db.execute(
            "SELECT outcome FROM job_attempts WHERE job_id = ? ORDER BY id", (job_id,)
        ).fetchall()
    assert job == ("queued", 1, 4)  # queued again; the attempt it used is given back
    assert outcomes == [("released",)]
