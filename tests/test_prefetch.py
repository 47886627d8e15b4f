"""The worker's look-ahead: a queued job's image is decoded while the running job infers, and
nothing about the queued job changes (same results, cancel and missing files as before);
the real app over HTTP with the tiny checkpoints."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from service.config import Settings
from tests.conftest import RunningService, make_image

Serve = Callable[..., RunningService]


class HeldDetector:
    """The real detector, noting the size of every image it is given; its first call waits
    until released, so jobs queue up behind it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.sizes: list[tuple[int, int]] = []
        self.inside = threading.Event()
        self.release = threading.Event()

    def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Any]:
        self.sizes.append(image.size)
        if not self.inside.is_set():
            self.inside.set()
            self.release.wait(timeout=60)
        return list(self.real.detect(image, query, **kw))


def hold(service: RunningService, monkeypatch: pytest.MonkeyPatch) -> HeldDetector:
    state = service.services.host.roles["detector"]
    held = HeldDetector(state.runtime)
    monkeypatch.setattr(state, "runtime", held)
    return held


def stored_path(job: dict[str, Any]) -> str:
    sha = job["input"]["sha256"]
    return f"images/{sha[:2]}/{sha}.jpg"


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the look-ahead did not happen"
        time.sleep(0.01)


X, Y, Z = make_image(320, 240), make_image(200, 100, color=(9, 9, 9)), make_image(120, 90)


def test_queued_images_are_decoded_ahead_and_results_do_not_change(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    prefetch = service.services.worker.prefetch
    alone = service.wait(service.submit(Y, queries="car, roof").json()["id"])  # decoded on claim
    assert alone["status"] == "succeeded"
    hits = prefetch.hits

    held = hold(service, monkeypatch)
    first = service.submit(X, queries="car, roof").json()
    assert held.inside.wait(timeout=60)
    behind = [service.submit(image, queries="car, roof").json() for image in (Y, Z)]
    wait_until(lambda: prefetch.holding == stored_path(behind[0]))
    held.release.set()
    done = [service.wait(job["id"]) for job in (first, *behind)]

    assert [job["status"] for job in done] == ["succeeded"] * 3
    assert prefetch.hits - hits == 2  # Y while X ran, Z while Y ran
    assert held.sizes == [(320, 240)] * 2 + [(200, 100)] * 2 + [(120, 90)] * 2
    assert done[1]["result"] == alone["result"]  # decoded ahead or on claim: the same job
    assert done[1]["params"] == alone["params"]


def test_a_job_cancelled_after_its_image_was_decoded_ahead_never_runs(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    prefetch = service.services.worker.prefetch
    held = hold(service, monkeypatch)
    first = service.submit(X, queries="car").json()
    assert held.inside.wait(timeout=60)
    cancelled = service.submit(Y, queries="car").json()
    wait_until(lambda: prefetch.holding == stored_path(cancelled))
    answer = service.client.post(f"/v1/jobs/{cancelled['id']}/cancel").json()
    assert answer["status"] == "cancelled"
    after = service.submit(Z, queries="car").json()
    held.release.set()

    assert service.wait(first["id"])["status"] == "succeeded"
    assert service.wait(after["id"])["status"] == "succeeded"
    assert service.wait(cancelled["id"])["status"] == "cancelled"
    assert held.sizes == [(320, 240), (120, 90)]  # Z ran on its own pixels, Y not at all


def test_an_image_removed_after_it_was_decoded_ahead_fails_the_job_as_before(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    prefetch = service.services.worker.prefetch
    held = hold(service, monkeypatch)
    first = service.submit(X, queries="car").json()
    assert held.inside.wait(timeout=60)
    gone = service.submit(Y, queries="car", max_attempts="1").json()
    wait_until(lambda: prefetch.holding == stored_path(gone))
    (settings.data_dir / stored_path(gone)).unlink()
    held.release.set()

    assert service.wait(first["id"])["status"] == "succeeded"
    failed = service.wait(gone["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "input_missing", failed
