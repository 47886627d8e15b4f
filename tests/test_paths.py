"""Path submissions through the real HTTP app: confined to AIP_ALLOWED_DIRS while another
thread swaps folders for symlinks and files for FIFOs, and each unusable path is a clear 4xx."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningService, gate_detector, make_settings

Serve = Callable[..., RunningService]
SUBMISSIONS = 200


def tiny_png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


INSIDE, OUTSIDE = tiny_png((10, 200, 10)), tiny_png((200, 10, 10))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "img.png").write_bytes(OUTSIDE)
    return allowed, outside


@pytest.fixture
def service(
    tmp_path: Path, folders: tuple[Path, Path], serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningService]:
    """A service that accepts paths under `allowed` and never gets past its first job's
    detection, so accepted jobs cost nothing; released before the service stops."""
    running = serve(make_settings(tmp_path, allowed_dirs=(folders[0],), shutdown_grace_seconds=5))
    gate = gate_detector(running, monkeypatch)
    yield running
    gate.release.set()


def submit_many(service: RunningService, path: Path, stop: threading.Event) -> list[Any]:
    """SUBMISSIONS path submissions from 8 threads, each with its own connection; every
    request is bounded, so a hang fails the test instead of stalling it."""
    local = threading.local()
    clients: list[httpx.Client] = []

    def one(_: int) -> tuple[int, dict[str, Any]]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=service.url, timeout=20)
            clients.append(local.client)
        response = local.client.post("/v1/jobs", json={"path": str(path)})
        return response.status_code, response.json()

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(SUBMISSIONS)]
            return [f.result(timeout=60) for f in futures]
    finally:
        stop.set()
        for client in clients:
            client.close()


def flipping(action: Callable[[], None]) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            action()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread, stop


def test_a_folder_swapped_for_a_symlink_never_leads_outside(
    service: RunningService, folders: tuple[Path, Path]
) -> None:
    allowed, outside = folders
    real, parked = allowed / "d", allowed / "parked"
    real.mkdir()
    (real / "img.png").write_bytes(INSIDE)

    def swap() -> None:  # real folder -> missing -> symlink to outside -> missing -> real
        os.rename(real, parked)
        os.symlink(outside, real)
        os.unlink(real)
        os.rename(parked, real)

    thread, stop = flipping(swap)
    answers = submit_many(service, real / "img.png", stop)
    thread.join(timeout=10)
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {202, 403, 404}, statuses
    accepted = [body for status, body in answers if status == 202]
    outside_sha = hashlib.sha256(OUTSIDE).hexdigest()
    assert [b["id"] for b in accepted if b["input"]["sha256"] == outside_sha] == []
    assert all(b["input"]["sha256"] == hashlib.sha256(INSIDE).hexdigest() for b in accepted)
    assert accepted and 403 in statuses  # both sides of the race were exercised
    refused = next(body for status, body in answers if status == 403)
    assert refused["code"] == "path_not_allowed" and "AIP_ALLOWED_DIRS" in refused["message"]


def test_a_file_swapped_for_a_fifo_never_hangs_the_service(
    service: RunningService, folders: tuple[Path, Path]
) -> None:
    allowed = folders[0]
    target, spare_file, spare_fifo = (allowed / n for n in ("img.png", ".file", ".fifo"))
    target.write_bytes(INSIDE)

    def swap() -> None:  # each replace is atomic: the path is always a file or a FIFO
        spare_file.write_bytes(INSIDE)
        os.replace(spare_file, target)
        os.mkfifo(spare_fifo)
        os.replace(spare_fifo, target)

    thread, stop = flipping(swap)
    answers = submit_many(service, target, stop)
    thread.join(timeout=10)
    statuses = {status for status, _ in answers}
    assert statuses <= {202, 422}, statuses
    assert 422 in statuses
    refused = next(body for status, body in answers if status == 422)
    assert refused["code"] == "not_a_regular_file"
    service.services.host.roles["detector"].runtime.release.set()
    service.stop()
    assert not service._thread.is_alive()  # stopped cleanly: no thread stuck in an open()


def _symlinks(allowed: Path, outside: Path) -> None:
    (allowed / "absolute.png").symlink_to(outside / "img.png")
    (allowed / "relative.png").symlink_to(Path("..") / "outside" / "img.png")
    (allowed / "linked-folder").symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("../outside/img.png", 403, "path_not_allowed"),
        ("sub/../img.png", 403, "path_not_allowed"),
        ("absolute.png", 403, "path_not_allowed"),
        ("relative.png", 403, "path_not_allowed"),
        ("linked-folder/img.png", 403, "path_not_allowed"),
        ("sub", 422, "not_a_regular_file"),
        ("fifo.png", 422, "not_a_regular_file"),
        ("missing.png", 404, "file_not_found"),
        ("img.png/more.png", 404, "file_not_found"),
    ],
)
def test_unusable_paths_are_a_clear_refusal(
    service: RunningService, folders: tuple[Path, Path], name: str, status: int, code: str
) -> None:
    allowed, outside = folders
    (allowed / "sub").mkdir()
    (allowed / "img.png").write_bytes(INSIDE)
    os.mkfifo(allowed / "fifo.png")
    _symlinks(allowed, outside)
    response = service.client.post("/v1/jobs", json={"path": f"{allowed}/{name}"})
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    if status == 403:
        assert "AIP_ALLOWED_DIRS" in response.json()["message"]


def test_paths_outside_or_with_no_allowed_folders_are_refused(
    tmp_path: Path, service: RunningService, folders: tuple[Path, Path], serve: Serve
) -> None:
    response = service.client.post("/v1/jobs", json={"path": str(folders[1] / "img.png")})
    assert (response.status_code, response.json()["code"]) == (403, "path_not_allowed")
    closed = serve(make_settings(tmp_path / "closed"))
    response = closed.client.post("/v1/jobs", json={"path": str(folders[1] / "img.png")})
    assert response.status_code == 403 and "AIP_ALLOWED_DIRS" in response.json()["message"]
    # Refused with any text holding a NUL in the body (no store can keep it), before the path.
    response = service.client.post("/v1/jobs", json={"path": "frame\x00.png"})
    assert (response.status_code, response.json()["code"]) == (422, "invalid_text")


def test_an_allowed_folder_may_itself_be_a_symlink(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the configured folder points is the administrator's choice; below it, nothing
    is followed."""
    real = tmp_path / "real"
    (real / "flights").mkdir(parents=True)
    (real / "flights" / "img.png").write_bytes(INSIDE)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    service = serve(make_settings(tmp_path, allowed_dirs=(link,)))
    gate = gate_detector(service, monkeypatch)
    try:
        for path in (link / "flights" / "img.png", real / "flights" / "img.png"):
            response = service.client.post("/v1/jobs", json={"path": str(path)})
            assert response.status_code == 202, response.text
            assert response.json()["source_path"] == str(real / "flights" / "img.png")
    finally:
        gate.release.set()
