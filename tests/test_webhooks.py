"""Completion webhooks: the URL check, the delivery rows the database writes as jobs end (real
SQLite), the sender against a real receiver on 127.0.0.1 (signature, one request per delivery
id, retries), URLs from a job, a folder config, a profile and the settings, refusals of bad
URLs, and deliveries left pending by a `kill -9` of `aip serve` sent after its restart."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from service.cli.output import print_job
from service.config import Settings, webhook_url
from service.detection import Detection
from service.errors import InvalidInput, JobFailure
from service.jobspec import parse_options
from service.store import webhooks as store
from service.store.migrate import migrate
from service.store.queue import ImageRecord, Outcome, Queue
from service.store.reads import Reads
from service.store.sqlite import read_engine
from service.webhooks import Webhooks, sign
from tests.conftest import (
    RunningService,
    free_port,
    gate_detector,
    make_image,
    make_settings,
    start_process,
)

T = TypeVar("T")
Serve = Callable[..., RunningService]
SECRET = "s3cret"
FINISHED = ("succeeded", "failed", "cancelled")


class Receiver:
    """A webhook receiver on 127.0.0.1: records every request, answers each path with the
    statuses scripted for it in turn (then 200)."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                answers = receiver.script.get(self.path) or [200]
                status = answers.pop(0) if len(answers) > 1 else answers[0]
                receiver.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                        "answer": status,
                    }
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def by_delivery(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for request in self.requests:
            out.setdefault(request["headers"]["X-AIP-Delivery"], []).append(request)
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def signed(request: dict[str, Any], secret: str = SECRET) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), request["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(request["headers"].get("X-AIP-Signature", ""), expected)


def settled(http: httpx.Client, job_id: int, timeout: float = 60) -> dict[str, Any]:
    """The job once it has ended and none of its deliveries is pending any more."""
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        hooks = job.get("webhooks") or []
        if job["status"] in FINISHED and hooks and all(h["status"] != "pending" for h in hooks):
            return job
        assert time.monotonic() < deadline, f"job {job_id}: {job['status']}, {hooks}"
        time.sleep(0.05)


# -- the URL check ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/hook",
        "https://hooks.example.com/aip?token=abc",
        "HTTPS://example.com",
        "http://[::1]:8080/",
    ],
)
def test_http_and_https_urls_are_accepted(url: str) -> None:
    assert webhook_url(f"  {url} ") == url
    assert parse_options({"webhook": url}, "the request") == {"webhook": url}


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http://",
        "example.com/hook",
        "http://exa mple.com/",
        "http://example.com/\x00",
        "http://example.com:99999/",
        "https://example.com/" + "a" * 2000,
        42,
        ["http://example.com"],
    ],
)
def test_other_urls_are_refused(url: Any) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_options({"webhook": url}, "the request")
    assert refused.value.code == "invalid_webhook"
    assert refused.value.status == 422
    if isinstance(url, str):
        with pytest.raises(ValueError):
            webhook_url(url)


def test_a_bad_setting_stops_start_up() -> None:
    with pytest.raises(ValueError, match="AIP_WEBHOOK_URL"):
        Settings.from_env({"AIP_WEBHOOK_URL": "ftp://example.com"})
    with pytest.raises(ValueError):
        Settings(webhook_url="not a url")
    env = {"AIP_WEBHOOK_URL": "https://example.com/h", "AIP_WEBHOOK_SECRET": SECRET}
    settings = Settings.from_env(env)
    assert (settings.webhook_url, settings.webhook_secret) == ("https://example.com/h", SECRET)
    assert SECRET not in repr(settings)


def test_the_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"id": 1}'
    digest = hmac.new(b"key", body, hashlib.sha256).hexdigest()
    assert sign("key", body) == f"sha256={digest}"
    assert sign("key", body + b" ") != sign("key", body)


# -- the rows: one per time a job with a URL ends, written by the transaction that ends it -------

IMAGE = ImageRecord("ab" * 32, 10, 4, 4, "PNG", "images/x.png")
HOOK = "http://127.0.0.1:9/hook"


def with_store(db: Path, scenario: Callable[[Queue, Reads], Awaitable[T]]) -> T:
    migrate(db)

    async def main() -> T:
        queue = await Queue.open(db)
        reads = Reads(read_engine(db))
        try:
            return await scenario(queue, reads)
        finally:
            await reads.close()
            await queue.close()

    return asyncio.run(main())


def rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT job_id, event, url, status, attempts FROM webhook_deliveries"
            " ORDER BY job_id, created_at, rowid"
        ).fetchall()


def test_every_way_a_job_ends_writes_one_delivery(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"
    params = {"queries": ["car"], "prompt": "p", "options": {}, "webhook": HOOK}

    async def scenario(queue: Queue, reads: Reads) -> None:
        async def job(with_hook: bool = True, max_attempts: int = 3) -> int:
            given = params if with_hook else {k: v for k, v in params.items() if k != "webhook"}
            job_id, _ = await queue.enqueue(
                IMAGE, given, input_name="x.png", max_attempts=max_attempts
            )
            return job_id

        succeeded, quiet, failed, cancelled, lost = [await job() for _ in range(5)]

        async def take(expected: int) -> Any:
            claim = await queue.claim("w", 60)
            assert claim is not None and claim.job_id == expected
            return claim

        detection = Detection("car", (0.0, 0.0, 1.0, 1.0), (4, 4))
        assert await queue.complete(await take(succeeded), Outcome([detection], "one car"))
        transient = JobFailure("model_error", "boom", transient=True)
        # Queued again to retry is not an end: no delivery yet (it goes behind the others).
        assert await queue.fail(await take(quiet), transient, retry_in=0.0) == "queued"
        final = JobFailure("bad_image", "no", transient=False)
        assert await queue.fail(await take(failed), final, retry_in=None) == "failed"
        assert await queue.request_cancel(cancelled) == "cancelled"
        await take(lost)  # on its last attempt when its worker vanishes
        await queue.write(
            lambda db: db.execute("UPDATE jobs SET max_attempts = 1 WHERE id = ?", (lost,))
        )
        assert await queue.recover(expired_only=False) == (0, 1)
        assert await queue.complete(await take(quiet), Outcome([], "nothing"))
        await queue.retry(failed)  # queued again by hand: a second end, a second delivery
        assert await queue.complete(await take(failed), Outcome([], "fine now"))
        plain = await job(with_hook=False)
        assert await queue.complete(await take(plain), Outcome([], "no hook"))

        found = rows(db)
        assert found == [
            (succeeded, "job.succeeded", HOOK, "pending", 0),
            (quiet, "job.succeeded", HOOK, "pending", 0),
            (failed, "job.failed", HOOK, "pending", 0),
            (failed, "job.succeeded", HOOK, "pending", 0),
            (cancelled, "job.cancelled", HOOK, "pending", 0),
            (lost, "job.failed", HOOK, "pending", 0),
        ]
        view = await reads.job(failed)
        assert [h["event"] for h in view["webhooks"]] == ["job.failed", "job.succeeded"]
        ids = [h["delivery_id"] for h in view["webhooks"]]
        assert len(set(ids)) == 2 and all(len(i) == 32 for i in ids)
        assert (await reads.job(plain))["webhooks"] == []

    with_store(db, scenario)


def test_an_attempt_that_fails_is_retried_later_then_failed_past_the_window(
    tmp_path: Path,
) -> None:
    db = tmp_path / "aip.db"
    answers: list[int] = [500, 500, 204]
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(answers.pop(0))

    async def scenario(queue: Queue, reads: Reads) -> None:
        params = {"queries": ["car"], "prompt": "p", "options": {}, "webhook": HOOK}
        job_id, _ = await queue.enqueue(IMAGE, params, input_name="x.png")
        claim = await queue.claim("w", 60)
        assert claim is not None
        assert await queue.complete(claim, Outcome([], "done"))
        now = [time.time()]
        settings = make_settings(tmp_path, webhook_secret=SECRET, webhook_retry_base_seconds=30.0)
        hooks = Webhooks(
            settings, queue, reads, transport=httpx.MockTransport(answer), clock=lambda: now[0]
        )
        # One pass of the loop, by hand: what is due is sent, its outcome recorded.
        due, _ = await store.due(reads, now[0], 8)
        assert len(due) == 1
        await hooks._attempt(due[0])
        (hook,) = (await reads.job(job_id))["webhooks"]
        assert (hook["status"], hook["attempts"], hook["last_status"]) == ("pending", 1, 500)
        assert hook["last_error"] == "HTTP 500"
        with sqlite3.connect(db) as conn:
            (next_at,) = conn.execute("SELECT next_attempt_at FROM webhook_deliveries").fetchone()
        assert now[0] <= next_at <= now[0] + 30.0  # the first backoff's ceiling is the base
        assert (await store.due(reads, now[0], 8))[0] == []  # not due before its time
        now[0] = next_at
        (again,) = (await store.due(reads, now[0], 8))[0]
        assert again.id == due[0].id and again.attempts == 1
        # Past the retry window the next failure is final.
        hooks.settings = settings.replace(webhook_retry_for_seconds=0.0)
        await hooks._attempt(again)
        (hook,) = (await reads.job(job_id))["webhooks"]
        assert (hook["status"], hook["attempts"], hook["next_attempt_at"]) == ("failed", 2, None)
        assert (await store.due(reads, now[0] + 10**6, 8)) == ([], None)
        await hooks.stop()
        assert [r.headers["X-AIP-Delivery"] for r in seen] == [due[0].id] * 2
        assert all(r.headers["X-AIP-Event"] == "job.succeeded" for r in seen)
        assert all(r.headers["X-AIP-Signature"] == sign(SECRET, r.content) for r in seen)
        assert json.loads(seen[0].content)["id"] == job_id

    with_store(db, scenario)


# -- the running service against a real receiver --------------------------------------------------


def test_each_finished_job_reaches_the_receiver_once_signed(
    tmp_path: Path,
    serve: Serve,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str | None,
) -> None:
    service = serve(make_settings(tmp_path, webhook_secret=SECRET, database_url=database_url))
    http = service.client
    url = f"{receiver.url}/done"
    gate = gate_detector(service, monkeypatch)
    first = service.submit(make_image(48, 48), webhook=url).json()["id"]
    assert gate.inside.wait(30)
    waiting = service.submit(make_image(50, 50), webhook=url).json()["id"]
    assert http.post(f"/v1/jobs/{waiting}/cancel").json()["status"] == "cancelled"
    plain = service.submit(make_image(52, 52)).json()["id"]
    gate.release.set()

    jobs = {job_id: settled(http, job_id) for job_id in (first, waiting)}
    assert service.wait(plain)["webhooks"] == []
    deliveries = receiver.by_delivery()
    assert len(deliveries) == 2
    for delivery_id, requests in deliveries.items():
        (request,) = requests  # once per delivery id
        assert signed(request), request["headers"]
        sent = json.loads(request["body"])
        job = jobs[sent["id"]]
        (hook,) = job["webhooks"]
        assert hook["delivery_id"] == delivery_id
        assert (hook["status"], hook["attempts"], hook["last_status"]) == ("delivered", 1, 200)
        assert hook["url"] == url and hook["delivered_at"] is not None
        assert request["headers"]["X-AIP-Event"] == f"job.{job['status']}"
        assert request["headers"]["Content-Type"] == "application/json"
        assert sent["status"] == job["status"] and sent["params"]["webhook"] == url
    assert {jobs[first]["status"], jobs[waiting]["status"]} == {"succeeded", "cancelled"}
    assert jobs[first]["result"] is not None
    assert json.loads(receiver.requests[0]["body"]).keys() <= jobs[first].keys()


def test_a_failing_receiver_is_retried_until_it_answers(
    tmp_path: Path, serve: Serve, receiver: Receiver, database_url: str | None
) -> None:
    settings = make_settings(
        tmp_path,
        webhook_secret=SECRET,
        webhook_retry_base_seconds=0.05,
        database_url=database_url,
    )
    service = serve(settings)
    receiver.script["/flaky"] = [500, 503, 200]
    job_id = service.submit(webhook=f"{receiver.url}/flaky").json()["id"]
    job = settled(service.client, job_id)
    (hook,) = job["webhooks"]
    assert (hook["status"], hook["attempts"], hook["last_status"]) == ("delivered", 3, 200)
    assert hook["last_error"] is None
    shown = io.StringIO()
    print_job(job, shown)  # `aip show`
    assert (
        f"webhook    delivered to {receiver.url}/flaky (3 attempts, HTTP 200)" in shown.getvalue()
    )
    later = hook["delivered_at"]
    pending = {**hook, "status": "pending", "last_status": 500, "last_error": "HTTP 500"}
    shown = io.StringIO()
    print_job({**job, "webhooks": [{**pending, "next_attempt_at": later}]}, shown)
    said = " ".join(shown.getvalue().split())  # long lines wrap
    assert f"(3 attempts, HTTP 500): HTTP 500; next try {later[:10]}" in said
    requests = receiver.requests
    assert [r["answer"] for r in requests] == [500, 503, 200]
    assert {r["headers"]["X-AIP-Delivery"] for r in requests} == {hook["delivery_id"]}
    assert all(signed(r) for r in requests)


def test_urls_from_a_folder_a_profile_and_the_settings(
    tmp_path: Path, serve: Serve, receiver: Receiver
) -> None:
    settings = make_settings(
        tmp_path, webhook_url=f"{receiver.url}/everyone", inbox_settle_seconds=0.2
    )
    service = serve(settings)
    http = service.client
    made = http.put(
        "/v1/profiles/hooked",
        json={"description": "", "params": {"webhook": f"{receiver.url}/profile"}},
    )
    assert made.status_code == 201, made.text
    folder = settings.inbox_dir / "site"
    folder.mkdir(parents=True)
    (folder / "aip.json").write_text(json.dumps({"webhook": f"{receiver.url}/folder"}))
    (folder / "frame.jpg").write_bytes(make_image(44, 44))
    by_profile = service.submit(make_image(46, 46), profile="hooked").json()["id"]
    by_setting = service.submit(make_image(48, 48)).json()["id"]
    own = service.submit(make_image(50, 50), profile="hooked", webhook=f"{receiver.url}/own")
    by_job = own.json()["id"]

    deadline = time.monotonic() + 60
    while not (inboxed := http.get("/v1/jobs", params={"source": "inbox"}).json()["jobs"]):
        assert time.monotonic() < deadline, "the inbox never queued the file"
        time.sleep(0.05)
    by_folder = inboxed[0]["id"]
    expected = {by_folder: "/folder", by_profile: "/profile", by_setting: "/everyone"}
    expected[by_job] = "/own"
    for job_id, path in expected.items():
        (hook,) = settled(http, job_id)["webhooks"]
        assert hook["url"] == receiver.url + path and hook["status"] == "delivered"
    sent = {json.loads(r["body"])["id"]: r["path"] for r in receiver.requests}
    assert sent == expected
    assert all("X-AIP-Signature" not in r["headers"] for r in receiver.requests)  # no secret


def test_invalid_urls_are_refused_with_422(tmp_path: Path, serve: Serve) -> None:
    service = serve(make_settings(tmp_path))
    http = service.client
    for url in ("ftp://example.com/x", "http://", "not a url", "http://x/" + "a" * 2000):
        refused = service.submit(webhook=url)
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "invalid_webhook"
        assert "`webhook`" in refused.json()["message"]
    put = http.put(
        "/v1/profiles/bad", json={"description": "", "params": {"webhook": "gopher://x"}}
    )
    assert put.status_code == 422 and put.json()["code"] == "invalid_webhook", put.text
    assert http.get("/v1/jobs").json()["jobs"] == []


# -- kill -9 ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_delivery_pending_at_kill_9_is_sent_after_the_restart(
    tmp_path: Path, tiny_checkpoints: tuple[Path, Path]
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    # A receiver that takes the connection and never answers: the job's delivery is in flight,
    # its row still pending, when the service is killed.
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    hook_port = silent.getsockname()[1]
    hook = f"http://127.0.0.1:{hook_port}/after-crash"
    process = start_process(data_dir, port, tiny_checkpoints, webhook_secret=SECRET)
    try:
        files = {"image": ("f.jpg", make_image(40, 40), "image/jpeg")}
        job_id = httpx.post(f"{url}/v1/jobs", files=files, data={"webhook": hook}).json()["id"]
        deadline = time.monotonic() + 120
        while True:
            job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
            if job["status"] in FINISHED and job["webhooks"]:
                break
            assert time.monotonic() < deadline, job["status"]
            time.sleep(0.05)
        (pending,) = job["webhooks"]
        assert (pending["status"], pending["attempts"]) == ("pending", 0)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    silent.close()

    receiver = Receiver(hook_port)
    process = start_process(data_dir, port, tiny_checkpoints, webhook_secret=SECRET)
    try:
        with httpx.Client(base_url=url) as http:
            (hook_row,) = settled(http, job_id, timeout=60)["webhooks"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        receiver.close()
    assert hook_row["delivery_id"] == pending["delivery_id"]
    assert (hook_row["status"], hook_row["attempts"]) == ("delivered", 1)
    (request,) = receiver.requests
    assert request["headers"]["X-AIP-Delivery"] == pending["delivery_id"]
    assert request["path"] == "/after-crash" and signed(request)
    assert json.loads(request["body"])["status"] == job["status"] == "succeeded"
