"""Follow-up questions on a finished job: the same tokens as mlx-vlm's plain generate with and
without the cached prompt prefix, through the real app on the tiny checkpoints, refusals, a
restart, and the cache's place in the memory budget."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from service.config import Settings
from service.errors import JobFailure
from service.followups import FollowUps
from service.models.host import ModelHost
from tests.conftest import RunningService, gate_detector, make_image
from tests.test_cli import run

Serve = Callable[..., RunningService]
TOKENS = 12


def on_model_thread(host: ModelHost, fn: Callable[[], Any]) -> Any:
    return asyncio.run(host.thread.run(fn))


def plain_tokens(reasoner: Any, image: Image.Image, messages: Any) -> list[int]:
    """mlx-vlm's own generation on the whole prompt, image included: no cache of ours."""
    from mlx_vlm import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    prompt = apply_chat_template(reasoner.processor, reasoner.model.config, messages, num_images=1)
    *_, last = stream_generate(
        reasoner.model,
        reasoner.processor,
        prompt,
        image=[image],
        max_tokens=TOKENS,
        temperature=0.0,
        skip_special_tokens=True,
    )
    return [int(t) for t in last.token_ids or []]


def picture(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.open(io.BytesIO(make_image(width, height, color=color))).convert("RGB")


def test_answers_with_and_without_the_cached_prefix_equal_plain_generate(
    model_host: ModelHost,
) -> None:
    reasoner = model_host.roles["reasoner"].runtime

    def check() -> None:
        from mlx_vlm.prompt_utils import apply_chat_template

        for image, prompt in (
            (picture(320, 240, (40, 120, 200)), "1. car at [1, 2, 30, 40]\n\nWhat is here?"),
            (picture(200, 310, (200, 60, 20)), "No objects.\n\nIs the road flooded?"),
        ):
            reasoner.prefixes.clear()
            job = reasoner.generate(image, reasoner.messages(prompt), max_tokens=TOKENS)
            # The job's own prompt: formatted as the string form always was.
            as_text = apply_chat_template(
                reasoner.processor, reasoner.model.config, prompt, num_images=1
            )
            as_chat = apply_chat_template(
                reasoner.processor, reasoner.model.config, reasoner.messages(prompt), num_images=1
            )
            assert as_text == as_chat
            assert job.token_ids == plain_tokens(reasoner, image, prompt)
            assert len(job.token_ids) > 0
            chat = reasoner.messages(prompt, job.text, "And the second one?")
            cached = reasoner.generate(image, chat, max_tokens=TOKENS)
            assert cached.cached_tokens > 0  # the job's prefix was reused, not prefilled again
            assert cached.token_ids == plain_tokens(reasoner, image, chat)
            reasoner.prefixes.clear()  # features gone: recomputed, same answer
            again = reasoner.generate(image, chat, max_tokens=TOKENS)
            assert again.token_ids == cached.token_ids

    on_model_thread(model_host, check)


def finished_job(service: RunningService, **data: Any) -> dict[str, Any]:
    response = service.submit(make_image(320, 240), queries="car", **data)
    assert response.status_code == 202, response.text
    job = service.wait(response.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def test_a_follow_up_is_answered_stored_shown_and_searchable(
    settings: Settings, serve: Serve
) -> None:
    service = serve(settings)
    job = finished_job(service)
    asked = service.client.post(
        f"/v1/jobs/{job['id']}/ask?wait=60",
        json={"question": "Is the zebracrossing\x00 visible?", "max_tokens": 5},
    )
    assert asked.status_code == 200, asked.text
    followup = asked.json()
    assert followup["status"] == "succeeded" and followup["n"] == 1, followup
    assert followup["question"] == "Is the zebracrossing visible?"  # control characters gone
    assert isinstance(followup["answer"], str) and followup["timings_ms"]["reason"] > 0
    assert asked.headers["location"] == f"/v1/jobs/{job['id']}/followups/1"

    shown = service.client.get(f"/v1/jobs/{job['id']}").json()
    assert shown["followups"] == [followup]
    assert shown["status"] == "succeeded" and shown["result"] == job["result"]
    assert service.client.get(f"/v1/jobs/{job['id']}/followups/1").json() == followup
    found = service.client.get("/v1/jobs", params={"q": "zebracrossing"}).json()["jobs"]
    assert [j["id"] for j in found] == [job["id"]]
    report = service.client.get("/v1/models").json()
    assert report["prefix_cache_bytes"] > 0  # the job's prefix, kept for more questions

    # Queued without waiting: 202 and its link; the answer comes on its own.
    queued = service.client.post(f"/v1/jobs/{job['id']}/ask", json={"question": "More?"})
    assert queued.status_code == 202 and queued.json()["n"] == 2, queued.text
    second = service.client.get(f"/v1/jobs/{job['id']}/followups/2?wait=60").json()
    assert second["status"] == "succeeded", second


def test_aip_ask_waits_for_the_answer(
    settings: Settings, serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    service = serve(settings)
    job = finished_job(service)
    code, out, _ = run(
        capsys, "ask", str(job["id"]), "How many?", "--wait", "--json", "--url", service.url
    )
    assert code == 0 and json.loads(out)["status"] == "succeeded", out
    code, _, err = run(capsys, "ask", "999999", "How many?", "--url", service.url)
    assert code != 0 and err.startswith("aip: ") and "does not exist" in err, err


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"question": "   \x01 "}, "invalid_question"),
        ({"question": "x" * 5000}, "invalid_question"),
        ({}, "invalid_question"),
        ({"question": "ok", "max_tokens": 10**6}, "invalid_option"),
        ({"question": "ok", "max_tokens": 0}, "invalid_option"),
        ({"question": "ok", "colour": 1}, "unknown_fields"),
    ],
)
def test_bad_questions_are_refused(
    settings: Settings, serve: Serve, body: dict[str, Any], code: str
) -> None:
    service = serve(settings)
    response = service.client.post("/v1/jobs/1/ask", json=body)
    assert response.status_code == 422 and response.json()["code"] == code, response.text


class Broken:
    def reason(self, image: Image.Image, prompt: str, *, max_tokens: int) -> str:
        raise JobFailure("model_error", "this reasoner is broken on purpose", transient=False)


def test_asking_is_refused_for_jobs_that_did_not_succeed(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)

    def ask(job_id: int) -> Any:
        return service.client.post(f"/v1/jobs/{job_id}/ask", json={"question": "why?"})

    def refused(job_id: int, status: str) -> None:
        response = ask(job_id)
        assert response.status_code == 409, response.text
        assert response.json()["code"] == "job_not_succeeded"
        assert status in response.json()["message"]

    with monkeypatch.context() as patch:
        patch.setattr(service.services.host.roles["reasoner"], "runtime", Broken())
        failed = service.submit(make_image(40, 40)).json()["id"]
        assert service.wait(failed)["status"] == "failed"
    refused(failed, "failed")
    gate = gate_detector(service, monkeypatch)
    running = service.submit(make_image(48, 40)).json()["id"]
    assert gate.inside.wait(timeout=60)
    queued = service.submit(make_image(56, 40)).json()["id"]
    refused(queued, "queued")
    refused(running, "running")
    assert service.client.post(f"/v1/jobs/{queued}/cancel").status_code == 200
    refused(queued, "cancelled")
    gate.release.set()
    missing = ask(10**9)
    assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"
    assert service.client.get(f"/v1/jobs/{running}/followups/1").status_code == 404
    assert service.wait(running)["followups"] == []


def test_a_queued_follow_up_survives_a_restart_and_a_failure_is_its_own(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = serve(settings)
    job = finished_job(first)
    with monkeypatch.context() as patch:
        patch.setattr(FollowUps, "start", lambda self: None)  # nothing answers before the stop
        first.stop()
        first = serve(settings)
        accepted = first.client.post(f"/v1/jobs/{job['id']}/ask", json={"question": "Later?"})
        assert accepted.status_code == 202 and accepted.json()["status"] == "queued"
        first.stop()
    again = serve(settings)
    answered = again.client.get(f"/v1/jobs/{job['id']}/followups/1?wait=60").json()
    assert answered["status"] == "succeeded", answered

    # Its image gone (retention): the follow-up fails with the reason, the job stays as it was.
    for stored in settings.images_dir.rglob("*"):
        if stored.is_file():
            stored.unlink()
    failed = again.client.post(f"/v1/jobs/{job['id']}/ask?wait=60", json={"question": "Now?"})
    assert failed.status_code == 200 and failed.json()["status"] == "failed", failed.text
    assert failed.json()["error"]["code"] == "input_missing"
    after = again.client.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "succeeded" and after["result"] == job["result"]


def test_cached_prefixes_go_first_under_pressure_and_with_the_reasoner(
    settings: Settings, serve: Serve, model_host: ModelHost
) -> None:
    service = serve(settings)
    finished_job(service)
    reasoner = model_host.roles["reasoner"].runtime
    assert len(reasoner.prefixes) > 0 and model_host.cache_bytes() > 0
    held = dict(model_host.resident())
    # Pressure: the budget leaves no room beside the models; the models stay.
    freed = on_model_thread(model_host, lambda: model_host.fit_caches(0))
    assert freed > 0 and model_host.cache_bytes() == 0 and model_host.resident() == held
    finished_job(service)
    assert model_host.cache_bytes() > 0
    kept = weakref.ref(reasoner.prefixes)
    del reasoner
    asyncio.run(model_host.unload("reasoner"))
    gc.collect()
    assert model_host.cache_bytes() == 0 and kept() is None  # freed with the reasoner
    finished_job(service)  # loaded again for the job, with a cache of its own
    assert model_host.cache_bytes() > 0
