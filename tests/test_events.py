"""GET /v1/events through the real app under uvicorn: a job's events in order, a resume that
loses and repeats nothing, the job filter, the token rule, and a client that stops reading
(dropped, while jobs run on)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RunningService, gate_detector, make_image, make_settings
from PIL import Image

from service import cli
from service.cli import waiting
from service.cli.output import Progress
from service.client import Client
from service.events import FINISHED, EventBus
from service.models import commands
from service.models.host import ModelHost

Serve = Callable[..., RunningService]


def parse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Events from SSE lines: `data` parsed, comments skipped."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                event = json.loads(fields["data"])
                assert str(event["id"]) == fields["id"] and event["type"] == fields["event"]
                yield event
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


@contextmanager
def stream(
    service: RunningService, headers: dict[str, str] | None = None, **params: Any
) -> Iterator[Iterator[dict[str, Any]]]:
    """An open event stream (subscribed once this yields) and its events as they arrive."""
    with httpx.Client(base_url=service.url, timeout=60, headers=headers) as client:
        if service.settings.token and "token" not in params:
            client.headers["Authorization"] = f"Bearer {service.settings.token}"
        with client.stream("GET", "/v1/events", params=params) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield parse(response.iter_lines())


def until(events: Iterator[dict[str, Any]], done: Callable[[dict[str, Any]], bool]) -> list:
    seen = []
    for event in events:
        seen.append(event)
        if done(event):
            return seen
    raise AssertionError(f"the stream ended before the awaited event; saw {seen[-5:]}")


def finished(job_id: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["job_id"] == job_id and e["type"] in FINISHED


def test_a_job_s_events_arrive_in_order(serve: Serve, tmp_path: Path) -> None:
    service = serve(make_settings(tmp_path))
    with stream(service) as events:
        job_id = service.submit(make_image(), prompt="Describe.").json()["id"]
        seen = [e for e in until(events, finished(job_id)) if e["job_id"] == job_id]
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    types = [e["type"] for e in seen]
    assert types[:2] == ["job.created", "job.claimed"] and types[-1] == "job.succeeded"
    assert seen[0]["data"] == {"source": "api", "input_name": "frame.jpg"}
    assert seen[1]["data"]["attempt"] == 1 and seen[1]["data"]["worker"]
    stages = [e["data"]["stage"] for e in seen if e["type"] == "job.stage"]
    assert stages[0] == "decode" and stages[-2:] == ["reason", "persist"]
    assert [s for s in stages if s.startswith("detect:")], stages
    # The reasoning streams between its stage and the save, and adds up to the stored text.
    at = {e["data"]["stage"]: n for n, e in enumerate(seen) if e["type"] == "job.stage"}
    text_at = [n for n, e in enumerate(seen) if e["type"] == "job.text"]
    assert text_at and at["reason"] < min(text_at) and max(text_at) < at["persist"]
    pieces = [seen[n] for n in text_at]
    job = service.client.get(f"/v1/jobs/{job_id}").json()
    assert "".join(e["data"]["delta"] for e in pieces) == job["result"]["reasoning"]
    done = seen[-1]["data"]
    assert done["detections"] == len(job["result"]["detections"])
    assert set(done["timings_ms"]) >= {"decode", "reason", "total"}


def test_inbox_filings_and_refusals_are_heard(serve: Serve, tmp_path: Path) -> None:
    service = serve(make_settings(tmp_path, inbox_settle_seconds=0.2))
    inbox = service.settings.inbox_dir
    with stream(service) as events:
        (inbox / "notes.txt").write_text("not an image")
        (inbox / "frame.jpg").write_bytes(make_image())
        heard: set[str] = set()

        def both(event: dict[str, Any]) -> bool:
            heard.add(event["type"])
            return {"inbox.filed", "inbox.rejected"} <= heard

        seen = until(events, both)
    (filed,) = [e for e in seen if e["type"] == "inbox.filed"]
    rejected = [e for e in seen if e["type"] == "inbox.rejected"]
    created = next(e for e in seen if e["type"] == "job.created")
    assert created["data"] == {"source": "inbox", "input_name": "frame.jpg"}
    assert filed["job_id"] == created["job_id"] and created["id"] < filed["id"]
    assert filed["data"] == {"path": "frame.jpg", "job_id": created["job_id"], "outcome": "queued"}
    assert rejected[-1]["data"]["path"] == "notes.txt"
    assert rejected[-1]["data"]["code"] == "unsupported_type"


def test_a_reconnect_resumes_without_loss_or_repeats(serve: Serve, tmp_path: Path) -> None:
    service = serve(make_settings(tmp_path))
    with stream(service) as events:
        job_id = service.submit(make_image()).json()["id"]
        first = until(events, lambda e: e["type"] == "job.claimed")
    # Away while the job runs on; back with the last id seen, by header and by query.
    service.wait(job_id)
    with stream(service, headers={"Last-Event-ID": str(first[-1]["id"])}) as events:
        rest = until(events, finished(job_id))
    with stream(service, last_event_id=first[-1]["id"]) as events:
        again = until(events, finished(job_id))
    assert again == rest
    with stream(service, last_event_id=0, job_id=job_id) as events:
        whole = until(events, finished(job_id))
    mine = [e for e in first + rest if e["job_id"] == job_id]
    assert [e["id"] for e in mine] == [e["id"] for e in whole]
    assert len({e["id"] for e in first + rest}) == len(first + rest)


def test_the_job_filter_and_unknown_jobs(serve: Serve, tmp_path: Path) -> None:
    service = serve(make_settings(tmp_path))
    one = service.submit(make_image(color=(10, 20, 30))).json()["id"]
    two = service.submit(make_image(color=(200, 20, 30))).json()["id"]
    service.wait(one), service.wait(two)
    with stream(service, job_id=two, last_event_id=0) as events:
        seen = until(events, finished(two))
    assert {e["job_id"] for e in seen} == {two}
    assert seen[0]["type"] == "job.created"
    missing = service.client.get("/v1/events", params={"job_id": 10**6})
    assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"
    bad = service.client.get("/v1/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_event_id"


def test_the_token_may_come_as_a_query_on_this_route_only(serve: Serve, tmp_path: Path) -> None:
    service = serve(make_settings(tmp_path, token="s3cret-token"))
    plain = httpx.Client(base_url=service.url, timeout=30)
    assert plain.get("/v1/events").status_code == 401
    assert plain.get("/v1/events", params={"token": "wrong"}).status_code == 401
    assert plain.get("/v1/jobs", params={"token": "s3cret-token"}).status_code == 401
    with stream(service, token="s3cret-token") as events:
        job_id = service.submit(make_image()).json()["id"]
        assert until(events, finished(job_id))[-1]["type"] == "job.succeeded"
    # The browser rules still hold for a request that carries the token.
    foreign = plain.get(
        "/v1/events", params={"token": "s3cret-token"}, headers={"Host": "evil.example"}
    )
    assert foreign.status_code == 403 and foreign.json()["code"] == "host_not_allowed"
    plain.close()


def test_a_stalled_client_is_dropped_and_jobs_run_on(serve: Serve, tmp_path: Path) -> None:
    service = serve(make_settings(tmp_path))
    bus: EventBus = service.services.events
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a window that fills soon
    stalled.connect(("127.0.0.1", service.port))
    stalled.sendall(b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    deadline = time.monotonic() + 30
    while bus.listeners < 1:
        assert time.monotonic() < deadline, "the stalled client never subscribed"
        time.sleep(0.02)
    sub = next(iter(bus._subscribers))
    sub.limit = 32  # a small bound, so a few hundred events overrun it
    try:
        running = service.submit(make_image(color=(90, 90, 90))).json()["id"]
        filler = "x" * 4096
        for _ in range(5000):  # up to 20 MB: far more than the socket buffers hold
            bus.publish("job.text", {"delta": filler})
            if sub.dropped:
                break
        assert sub.dropped and sub.pending == 0 and bus.listeners == 0
        # Still connected, never reading: jobs run on and readers get everything.
        with stream(service) as events:
            job_id = service.submit(make_image()).json()["id"]
            assert until(events, finished(job_id))[-1]["type"] == "job.succeeded"
            assert bus.listeners == 1  # the reader only
        assert service.wait(running)["status"] == "succeeded"
    finally:
        stalled.close()


@pytest.mark.parametrize(
    "schema", [None, {"type": "object", "properties": {"n": {"type": "integer"}}}]
)
def test_streamed_reasoning_is_the_text_generate_gives(
    model_host: ModelHost, schema: dict[str, Any] | None
) -> None:
    loaded = model_host.roles["reasoner"].current
    assert loaded is not None
    runtime = loaded.runtime
    image = Image.open(io.BytesIO(make_image())).convert("RGB")
    pieces: list[str] = []

    def both() -> tuple[str, str]:
        plain = runtime.reason(image, "Count the cars.", max_tokens=24, schema=schema)
        runtime.prefixes.clear()  # the second prefills again too
        streamed = runtime.reason(
            image, "Count the cars.", max_tokens=24, schema=schema, on_text=pieces.append
        )
        return plain, streamed

    plain, streamed = asyncio.run(model_host.thread.run(both))
    assert plain and streamed == plain and "".join(pieces) == plain


def test_publish_from_threads_reaches_async_readers_in_order() -> None:
    async def main() -> list[int]:
        bus = EventBus()
        sub = bus.subscribe()
        published = await asyncio.gather(
            *(asyncio.to_thread(bus.publish, "job.stage", {"stage": str(n)}) for n in range(50))
        )
        got = [(await anext(sub)).id for _ in published]
        sub.close()
        assert bus.listeners == 0
        return got

    got = asyncio.run(main())
    assert got == sorted(got) and len(set(got)) == 50


def test_a_listener_that_raises_does_not_reach_the_publisher() -> None:
    bus, heard = EventBus(), list[Any]()

    def broken(event: Any) -> None:
        raise RuntimeError("boom")

    bus.on(broken)
    bus.on(heard.append)
    event = bus.publish("model.loaded", {"role": "detector"})
    assert heard == [event] and event.data == {"role": "detector"}


@pytest.mark.parametrize("kept", [3])
def test_the_ring_keeps_a_bounded_window(kept: int) -> None:
    clock = [1000.0]
    bus = EventBus(keep_seconds=60, keep_events=kept, clock=lambda: clock[0])
    first = bus.publish("job.created", job_id=1)
    for _ in range(5):
        bus.publish("job.stage", {"stage": "decode"}, job_id=1)
    assert len(bus.kept()) == kept and bus.kept()[0].id > first.id
    clock[0] += 61
    last = bus.publish("job.succeeded", job_id=1)
    assert bus.kept() == [last]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _no_polling(*_: Any) -> None:
    raise AssertionError("polled, though the event stream was open")


# A module's `time` whose sleep fails the test: only the polling fallback sleeps.
_STREAM_ONLY = types.SimpleNamespace(monotonic=time.monotonic, sleep=_no_polling)


def test_wait_follows_the_stream_and_falls_back_to_polling(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(make_settings(tmp_path))
    client = Client(service.settings, service.url)
    shown = _Terminal()
    monkeypatch.setattr(waiting, "Progress", lambda: Progress(shown))
    monkeypatch.setattr(waiting, "time", _STREAM_ONLY)
    gate = gate_detector(service, monkeypatch)
    job_id = service.submit(make_image(), queries="car").json()["id"]
    result: list[Any] = []
    waiter = threading.Thread(target=lambda: result.extend(waiting.wait_for(client, [job_id])))
    waiter.start()
    assert gate.inside.wait(60)
    deadline = time.monotonic() + 30
    while f"job {job_id}: running: detect 'car'" not in shown.getvalue():
        assert time.monotonic() < deadline, shown.getvalue()
        time.sleep(0.02)
    gate.release.set()
    waiter.join(60)
    assert [job["status"] for job in result] == ["succeeded"]
    # A service without the stream (an older one): the same wait, by polling.
    monkeypatch.setattr(waiting, "time", time)
    monkeypatch.setattr(waiting.EventStream, "open", lambda client: None)
    again = service.submit(make_image(color=(1, 2, 3))).json()["id"]
    assert waiting.wait_for(client, [again])[0]["status"] == "succeeded"


def test_progress_shows_the_reasoning_as_it_streams() -> None:
    job = {"id": 4, "status": "running", "stage": "reason", "reasoning_so_far": "Two cars\npark"}
    assert waiting.progress_text([job]) == "job 4: running: reason: Two cars park"
    job["reasoning_so_far"] = "word " * 20
    assert waiting.progress_text([job]) == "job 4: running: reason: ..." + " word" * 8


def test_model_loads_are_heard_and_the_cli_draws_them_from_the_stream(
    serve: Serve,
    tmp_path: Path,
    tiny_checkpoints: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    detector, reasoner = tiny_checkpoints
    host = ModelHost({"detector": str(detector), "reasoner": str(reasoner)})
    try:
        service = serve(make_settings(tmp_path), host=host)
        deadline = time.monotonic() + 60
        while service.client.get("/v1/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with stream(service) as events:
            loaded = service.client.post(
                "/v1/models/reasoner/load", json={"model": str(reasoner), "wait": True}
            )
            assert loaded.status_code == 200, loaded.json()
            seen = until(events, lambda e: e["type"] == "model.loaded")
            service.client.post("/v1/models/reasoner/unload")
            gone = until(events, lambda e: e["type"] == "model.unloaded")[-1]
            missing = {"model": str(tmp_path / "no-such-model"), "wait": True}
            assert service.client.post("/v1/models/detector/load", json=missing).is_client_error
            failed = until(events, lambda e: e["data"].get("phase") == "failed")[-1]
            assert failed["data"]["role"] == "detector" and failed["data"]["error"]
        progress = [e["data"] for e in seen if e["type"] == "model.progress"]
        assert {p["role"] for p in progress} == {"reasoner"}
        phases = [p["phase"] for p in progress]
        assert phases[0] == "resolve" and phases[-1] == "swap" and "load" in phases
        assert seen[-1]["data"] == {"role": "reasoner"}
        assert gone["data"] == {"role": "reasoner", "why": "asked to"}

        monkeypatch.setattr(commands, "time", _STREAM_ONLY)
        url = ["--url", service.url]
        assert cli.main(["models", "load", "reasoner", str(reasoner), "--no-pull", *url]) == 0
        out, err = capsys.readouterr()
        assert "reasoner: " in err and "serving" in out
    finally:
        asyncio.run(host.close())
