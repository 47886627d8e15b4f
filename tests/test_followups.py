"""Follow-up questions on a finished job: the same tokens as mlx-vlm's plain generate with and
without the cached prompt prefix, through the real app on the tiny checkpoints, refusals, a
restart, and the cache's place in the memory budget."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service import followups as followups_module
from service.api.followups import MAX_BODY
from service.config import Settings
from service.errors import JobFailure
from service.followups import FollowUps
from service.models.host import ModelHost
from service.store import followups as followup_store
from service.store.queue import Queue
from tests.conftest import RunningService, gate_detector, make_image, make_settings
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
    tmp_path: Path, serve: Serve, database_url: str | None
) -> None:
    service = serve(make_settings(tmp_path, database_url=database_url))
    job = finished_job(service)
    asked = service.client.post(
        f"/v1/jobs/{job['id']}/ask?wait=60",
        json={"question": "Is the zebra\u202ecrossing\x00 visible?", "max_tokens": 5},
    )
    assert asked.status_code == 200, asked.text
    followup = asked.json()
    assert followup["status"] == "succeeded" and followup["n"] == 1, followup
    # Control and format characters (a bidi override) gone.
    assert followup["question"] == "Is the zebracrossing visible?"
    assert followup["reasoner"] == job["models"]["reasoner"] and followup["reasoner"]["id"]
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


def test_aip_show_lists_follow_ups_and_ask_points_at_it(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(FollowUps, "start", lambda self: None)  # nothing answers: all wait
    service = serve(settings)
    job = finished_job(service)
    url = ("--url", service.url)
    code, out, _ = run(capsys, "ask", str(job["id"]), "Where is the car?", *url)
    # Not `aip ask --wait`: that would ask a new question.
    assert code == 0 and f"`aip show {job['id']}`" in out and "--wait" not in out, out
    code, out, err = run(capsys, "ask", str(job["id"]), "And now?", "--timeout", "0.2", *url)
    assert code == 1 and "--timeout" in err and f"aip show {job['id']}" in err, err
    identity = json.dumps(job["models"]["reasoner"])
    with sqlite3.connect(settings.database) as db:  # as the loop would have stored them
        db.execute(
            "UPDATE followups SET status = 'succeeded', answer = ?, reasoner = ? WHERE n = 1",
            ("Left of the \x1b[31mtruck\u202e.", identity),
        )
        db.execute(
            "UPDATE followups SET status = 'failed', error_code = 'input_missing',"
            " error_message = 'the image is gone' WHERE n = 2"
        )
    code, out, _ = run(capsys, "show", str(job["id"]), *url)
    assert code == 0 and "follow-ups (2)" in out, out
    assert f"1. Where is the car? (succeeded, {job['models']['reasoner']['id']}" in out, out
    assert "Left of the \ufffd[31mtruck\ufffd." in out and "\x1b" not in out, out
    assert "2. And now? (failed)" in out and "input_missing: the image is gone" in out, out


def test_waiting_reads_through_the_read_pool_and_the_loop_claims_only_what_is_queued(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    claimed: list[Any] = []
    real_claim = followup_store.claim

    async def counted(queue: Queue, *lease: Any) -> Any:
        claimed.append(await real_claim(queue, *lease))
        return claimed[-1]

    monkeypatch.setattr(followup_store, "claim", counted)
    service = serve(settings)
    job = finished_job(service)
    time.sleep(5 * settings.poll_interval_seconds)  # idle: no write transaction to find nothing
    asked = service.client.post(f"/v1/jobs/{job['id']}/ask?wait=60", json={"question": "Why?"})
    assert asked.json()["status"] == "succeeded", asked.text
    assert [(a.job_id, a.n) for a in claimed] == [(job["id"], 1)]

    # A waiter wakes on the loop's event and reads on the read pool, not the writer's.
    writer_reads: list[str] = []
    real_read = Queue.read

    async def spied(self: Queue, fn: Any, *args: Any, **kw: Any) -> Any:
        writer_reads.append(getattr(fn, "__module__", ""))
        return await real_read(self, fn, *args, **kw)

    monkeypatch.setattr(Queue, "read", spied)
    monkeypatch.setattr(FollowUps, "_announce_end", lambda self: None)  # no wake: all of wait
    queued = service.client.post(f"/v1/jobs/{job['id']}/ask", json={"question": "And?"})
    waited = service.client.get(f"{queued.json()['links']['self']}?wait=0.5").json()
    assert waited["n"] == 2 and "service.api.followups" not in writer_reads, writer_reads


def test_follow_ups_per_job_are_capped(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch, database_url: str | None
) -> None:
    monkeypatch.setattr(FollowUps, "start", lambda self: None)  # nothing answers: all wait
    service = serve(make_settings(tmp_path, database_url=database_url))
    job = finished_job(service)

    def ask() -> Any:
        return service.client.post(f"/v1/jobs/{job['id']}/ask", json={"question": "Why?"})

    for n in range(1, followup_store.MAX_QUEUED + 1):
        assert ask().json()["n"] == n
    waiting = ask()
    assert waiting.status_code == 429 and waiting.json()["code"] == "too_many_followups"
    monkeypatch.setattr(followup_store, "MAX_PER_JOB", followup_store.MAX_QUEUED)
    full = ask()
    assert full.status_code == 409 and full.json()["code"] == "followup_limit", full.text


def test_refusals_name_what_is_wrong(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    job = finished_job(service)
    unknown = service.client.get("/v1/jobs/999/followups/1")
    assert unknown.status_code == 404 and unknown.json()["code"] == "job_not_found"
    assert service.client.get(f"/v1/jobs/{job['id']}/followups/1").json()["code"] == (
        "followup_not_found"
    )
    for path in (f"/v1/jobs/{job['id']}/followups/1", f"/v1/jobs/{job['id']}/ask"):
        for wait in ("nan", "inf", "-1", "301"):
            refused = service.client.request(
                "GET" if "followups" in path else "POST",
                f"{path}?wait={wait}",
                json={"question": "Why?"},
            )
            assert refused.status_code == 422, refused.text
            assert "finite number of seconds from 0 to 300" in refused.json()["message"]
    big = json.dumps({"question": "x" * (MAX_BODY + 1)}).encode()
    for content in (big, iter([big[:1000], big[1000:]])):  # with Content-Length, then chunked
        too_large = service.client.post(f"/v1/jobs/{job['id']}/ask", content=content)
        assert too_large.status_code == 413, too_large.text
        assert too_large.json()["code"] == "payload_too_large"
    assert service.client.get(f"/v1/jobs/{job['id']}").json()["followups"] == []


def test_a_follow_up_running_at_shutdown_is_queued_again(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, shutdown_grace_seconds=0.2)
    inside, release = threading.Event(), threading.Event()

    def stuck(*args: Any, **kw: Any) -> str:
        inside.set()
        release.wait(timeout=60)
        return "late"

    service = serve(settings)
    job = finished_job(service)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(followups_module, "answer", stuck)
            asked = service.client.post(f"/v1/jobs/{job['id']}/ask", json={"question": "Why?"})
            assert asked.status_code == 202 and inside.wait(timeout=60)
            service.stop()  # its grace ends while the model still answers
    finally:
        release.set()
    with sqlite3.connect(settings.database) as db:
        assert db.execute("SELECT status FROM followups").fetchall() == [("queued",)]
    again = serve(settings)
    answered = again.client.get(f"/v1/jobs/{job['id']}/followups/1?wait=60").json()
    assert answered["status"] == "succeeded" and answered["answer"] != "late", answered
