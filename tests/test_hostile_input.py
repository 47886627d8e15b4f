"""Mangled uploads: every one gets a 202 or a clear 4xx, never a 500, and every accepted job
still ends in exactly one terminal state with the worker alive."""

from __future__ import annotations

import random
from collections.abc import Callable

from service.config import Settings
from tests.conftest import RunningService, make_image

TERMINAL = ("succeeded", "failed", "cancelled")


def mangled(rand: random.Random, original: bytes) -> bytes:
    data = bytearray(original)
    kind = rand.choice(["flip", "truncate", "splice", "zero"])
    if kind == "flip":
        for _ in range(rand.randint(1, 40)):
            data[rand.randrange(len(data))] ^= 1 << rand.randrange(8)
    elif kind == "truncate":
        del data[rand.randrange(1, len(data)) :]
    elif kind == "splice":
        at = rand.randrange(len(data))
        data[at:at] = rand.randbytes(rand.randint(1, 500))
    else:
        start = rand.randrange(len(data))
        data[start : start + rand.randint(1, 2000)] = bytes(min(2000, len(data) - start))
    return bytes(data)


def test_mangled_images_never_cause_a_500_or_a_stuck_job(
    settings: Settings, serve: Callable[..., RunningService]
) -> None:
    service = serve(settings)
    rand = random.Random(2024)
    originals = [make_image(96, 64), make_image(80, 80, fmt="PNG"), make_image(64, 48, fmt="WEBP")]
    accepted = []
    for i in range(40):
        data = mangled(rand, rand.choice(originals))
        response = service.submit(data, name=f"m{i}.jpg", queries="car", max_attempts="1")
        assert response.status_code in (202, 413, 415, 422), (i, response.text)
        if response.status_code == 202:
            accepted.append(response.json()["id"])
        else:
            assert response.json()["code"] and response.json()["message"]
    assert accepted, "some mangled images still decode and must be processed"
    for job_id in accepted:
        job = service.wait(job_id)
        assert job["status"] in TERMINAL
        assert (job["result"] is not None) == (job["status"] == "succeeded")
        if job["status"] == "failed":
            assert job["error"]["code"] and job["error"]["message"]
    after = service.wait(service.submit(make_image(50, 50)).json()["id"])
    assert after["status"] == "succeeded"  # the worker is still alive
