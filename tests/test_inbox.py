"""The watched inbox with real files, the real watcher and a real SQLite ledger."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.config import Settings
from service.detection import Detection
from service.models.host import ModelHost
from tests.conftest import RunningService, make_image, make_settings


class InstantDetector:
    def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
        return []


class InstantReasoner:
    def reason(self, image: Image.Image, prompt: str, **kw: Any) -> str:
        return "ok"


@pytest.fixture
def inbox_service(tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    """Services whose models answer at once: these tests are about files, not inference."""
    started: list[RunningService] = []

    def _serve(**changes: Any) -> RunningService:
        host = ModelHost(
            {"detector": "fake", "reasoner": "fake"},
            loaders={
                "detector": lambda p: InstantDetector(),
                "reasoner": lambda p: InstantReasoner(),
            },
            resolve_sources=False,
        )
        defaults = {
            "inbox": tmp_path / "inbox",
            "inbox_settle_seconds": 0.3,
            "inbox_rescan_seconds": 3600.0,
        }
        service = RunningService(make_settings(tmp_path, **{**defaults, **changes}), host)
        started.append(service.start())
        return service

    yield _serve
    for service in started:
        if service._thread.is_alive():
            service.stop()


def ledger(settings: Settings) -> list[tuple[str, str, int | None]]:
    db = sqlite3.connect(settings.database)
    return db.execute(
        "SELECT relative_path, outcome, job_id FROM inbox_files ORDER BY id"
    ).fetchall()


def until(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def inbox_jobs(service: RunningService) -> list[dict[str, Any]]:
    jobs, cursor = [], None
    while True:
        params: dict[str, Any] = {"source": "inbox", "limit": 200}
        if cursor:
            params["cursor"] = cursor
        page = service.client.get("/v1/jobs", params=params).json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return jobs


def test_a_file_written_in_chunks_becomes_one_job_on_the_complete_bytes(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    data = make_image(400, 300, fmt="PNG")
    with (inbox / "slow.png").open("wb") as out:
        for start in range(0, len(data), len(data) // 5 + 1):
            out.write(data[start : start + len(data) // 5 + 1])
            out.flush()
            time.sleep(0.15)  # pauses shorter than the settle delay
    jobs = until(lambda: inbox_jobs(service), what="a job")
    time.sleep(0.5)
    jobs = inbox_jobs(service)
    assert len(jobs) == 1
    import hashlib

    assert jobs[0]["input"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert jobs[0]["source_path"] == "slow.png" and jobs[0]["source"] == "inbox"
    assert (inbox / "processed" / "slow.png").read_bytes() == data
    assert not (inbox / "slow.png").exists()


def test_a_burst_of_500_files_gives_500_jobs_and_no_duplicates(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    (inbox / "card" / "DCIM").mkdir(parents=True)
    for i in range(500):
        (inbox / "card" / "DCIM" / f"IMG_{i:04d}.png").write_bytes(
            make_image(16 + i % 40, 16 + i // 40, fmt="PNG")
        )
    until(
        lambda: service.client.get("/v1/inbox").json()["since_start"]["ingested"] == 500,
        timeout=240,
        what="500 ingested",
    )
    status = service.client.get("/v1/inbox").json()
    assert status["since_start"]["duplicates"] == 0 and status["since_start"]["rejected"] == 0
    assert len(inbox_jobs(service)) == 500
    assert len(list((inbox / "processed" / "card" / "DCIM").iterdir())) == 500


def test_same_content_under_two_names_is_one_job_and_one_duplicate(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    data = make_image(50, 50)
    (inbox / "a.jpg").write_bytes(data)
    (inbox / "copy of a.jpg").write_bytes(data)
    until(lambda: len(ledger(service.settings)) == 2, what="two ledger rows")
    rows = ledger(service.settings)
    assert sorted(r[1] for r in rows) == ["duplicate", "queued"]
    assert rows[0][2] == rows[1][2]  # the duplicate names the first job
    assert len(inbox_jobs(service)) == 1
    assert service.client.get("/v1/inbox").json()["since_start"]["duplicates"] == 1
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == ["a.jpg", "copy of a.jpg"]


def test_files_present_before_start_are_ingested(
    tmp_path: Path, inbox_service: Callable[..., RunningService]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"early-{i}.jpg").write_bytes(make_image(30 + i, 30))
    service = inbox_service()
    until(lambda: len(inbox_jobs(service)) == 3, what="3 jobs")
    assert {j["source_path"] for j in inbox_jobs(service)} == {f"early-{i}.jpg" for i in range(3)}


def test_a_restart_in_the_middle_of_a_burst_loses_none_and_doubles_none(
    inbox_service: Callable[..., RunningService],
) -> None:
    first = inbox_service()
    inbox = first.settings.inbox_dir
    for i in range(150):
        (inbox / f"b{i:03d}.png").write_bytes(make_image(20 + i % 30, 20 + i // 30, fmt="PNG"))
    until(
        lambda: first.client.get("/v1/inbox").json()["since_start"]["ingested"] >= 20,
        what="some ingested",
    )
    first.stop()
    assert 0 < len(ledger(first.settings)) < 150, "the burst should be cut in the middle"
    second = inbox_service()
    until(lambda: len(inbox_jobs(second)) == 150, timeout=120, what="150 jobs")
    time.sleep(0.5)
    rows = ledger(second.settings)
    assert len(inbox_jobs(second)) == 150
    assert [r for r in rows if r[1] != "queued"] == []
    assert len({r[0] for r in rows}) == len(rows) == 150
    assert len(list((inbox / "processed").iterdir())) == 150


def test_ignored_and_rejected_files(inbox_service: Callable[..., RunningService]) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    ignored = [
        ".DS_Store",
        "._frame.jpg",
        "frame.jpg.part",
        "clip.crdownload",
        "x.tmp",
        "~$report.jpg",
        ".hidden.jpg",
    ]
    for name in ignored:
        (inbox / name).write_bytes(make_image())
    (inbox / "notes.txt").write_text("not a picture")
    (inbox / "fake.jpg").write_text("text renamed to .jpg")
    (inbox / "good.jpg").write_bytes(make_image())
    until(lambda: len(ledger(service.settings)) == 3, what="three ledger rows")
    until(lambda: (inbox / "failed" / "fake.jpg.error.json").exists(), what="error file")
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == sorted(ignored)
    notes = json.loads((inbox / "failed" / "notes.txt.error.json").read_text())
    assert notes["code"] == "unsupported_type"
    fake = json.loads((inbox / "failed" / "fake.jpg.error.json").read_text())
    assert fake["code"] == "not_an_image" and fake["message"]
    assert (inbox / "failed" / "fake.jpg").read_text() == "text renamed to .jpg"
    assert [j["source_path"] for j in inbox_jobs(service)] == ["good.jpg"]
    assert service.client.get("/v1/inbox").json()["since_start"]["rejected"] == 2


def test_folder_config_and_sidecar_parameters_reach_the_job(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    site = inbox / "site-a" / "north"
    site.mkdir(parents=True)
    (inbox / "site-a" / "aip.json").write_text(
        json.dumps({"queries": ["roof"], "prompt": "Damage?"})
    )
    (site / "aip.json").write_text(json.dumps({"max_attempts": 5}))
    (site / "f1.json").write_text(json.dumps({"queries": "car, truck"}))
    (site / "f1.jpg").write_bytes(make_image(40, 40))
    (site / "f2.jpg").write_bytes(make_image(41, 40))
    (inbox / "site-b").mkdir()
    (inbox / "site-b" / "aip.json").write_text("{not json")
    (inbox / "site-b" / "f3.jpg").write_bytes(make_image(42, 40))
    until(lambda: len(ledger(service.settings)) == 3, what="three files handled")
    jobs = {j["source_path"]: j for j in inbox_jobs(service)}
    f1, f2 = jobs["site-a/north/f1.jpg"], jobs["site-a/north/f2.jpg"]
    assert f1["params"]["queries"] == ["car", "truck"] and f1["params"]["prompt"] == "Damage?"
    assert f2["params"]["queries"] == ["roof"] and f2["max_attempts"] == 5
    assert (inbox / "processed" / "site-a" / "north" / "f1.json").exists()  # the sidecar follows
    error = json.loads((inbox / "failed" / "site-b" / "f3.jpg.error.json").read_text())
    assert error["code"] == "invalid_params" and "aip.json is not valid JSON" in error["message"]


def test_a_required_sidecar_is_waited_for(inbox_service: Callable[..., RunningService]) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    (inbox / "aip.json").write_text(json.dumps({"sidecar": "required"}))
    (inbox / "frame.jpg").write_bytes(make_image())
    waiting = until(lambda: service.client.get("/v1/inbox").json()["waiting"], what="waiting")
    assert "frame.json" in waiting["frame.jpg"]
    assert inbox_jobs(service) == []
    (inbox / "frame.json").write_text(json.dumps({"prompt": "From the sidecar"}))
    job = until(lambda: inbox_jobs(service), what="the job")[0]
    assert job["params"]["prompt"] == "From the sidecar"


def test_with_moving_off_files_stay_and_a_restart_adds_nothing(
    inbox_service: Callable[..., RunningService],
) -> None:
    first = inbox_service(inbox_move=False)
    inbox = first.settings.inbox_dir
    (inbox / "stay.jpg").write_bytes(make_image())
    until(lambda: len(inbox_jobs(first)) == 1, what="a job")
    first.stop()
    second = inbox_service(inbox_move=False)
    until(
        lambda: second.client.get("/v1/inbox").json()["since_start"]["already_known"] == 1,
        what="the file recognised",
    )
    assert len(inbox_jobs(second)) == 1 and (inbox / "stay.jpg").exists()
    assert len(ledger(second.settings)) == 1


def test_symlinks_out_of_the_inbox_are_not_followed_and_names_never_clash(
    tmp_path: Path, inbox_service: Callable[..., RunningService]
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(make_image(77, 77))
    os.symlink(secret, inbox / "link.jpg")
    (inbox / "processed").mkdir(exist_ok=True)
    (inbox / "processed" / "same.jpg").write_bytes(b"an older file that must survive")
    (inbox / "same.jpg").write_bytes(make_image(12, 12))
    until(lambda: (inbox / "processed" / "same-1.jpg").exists(), what="filed under a new name")
    assert (inbox / "processed" / "same.jpg").read_bytes() == b"an older file that must survive"
    assert [j["source_path"] for j in inbox_jobs(service)] == ["same.jpg"]
    assert (inbox / "link.jpg").is_symlink()  # left alone


def test_polling_mode_works_and_says_so(inbox_service: Callable[..., RunningService]) -> None:
    service = inbox_service(inbox_polling=True)
    assert service.client.get("/v1/inbox").json()["mode"] == "polling"
    (service.settings.inbox_dir / "polled.jpg").write_bytes(make_image())
    until(lambda: inbox_jobs(service), what="a job")
    job = inbox_jobs(service)[0]
    assert service.wait(job["id"])["status"] == "succeeded"


def test_inbox_jobs_are_filtered_from_uploads(inbox_service: Callable[..., RunningService]) -> None:
    service = inbox_service()
    service.submit(make_image(33, 33))
    (service.settings.inbox_dir / "dropped.jpg").write_bytes(make_image(34, 34))
    until(lambda: inbox_jobs(service), what="an inbox job")
    assert [j["source"] for j in inbox_jobs(service)] == ["inbox"]
    every = service.client.get("/v1/jobs").json()["jobs"]
    assert sorted(j["source"] for j in every) == ["api", "inbox"]


def test_the_watcher_survives_odd_files_and_folders(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    (inbox / "x").mkdir()
    (inbox / "x" / "a.jpg").write_bytes(make_image(21, 21))
    import shutil

    shutil.rmtree(inbox / "x")
    (inbox / "x").write_bytes(b"a file where a folder was")  # NotADirectoryError on stat
    os.close(
        os.open(os.path.join(os.fsencode(inbox), b"bad\xffname.jpg"), os.O_CREAT | os.O_WRONLY)
    )
    (inbox / "good.jpg").write_bytes(make_image(22, 22))
    until(lambda: [j["source_path"] for j in inbox_jobs(service)] == ["good.jpg"], what="job")
    status = service.client.get("/v1/inbox").json()
    assert status["mode"] == "events"
    (inbox / "later.jpg").write_bytes(make_image(23, 23))  # still ingesting afterwards
    until(lambda: len(inbox_jobs(service)) == 2, what="a second job")


def test_a_sidecar_still_being_written_is_waited_for(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    (inbox / "aip.json").write_text(json.dumps({"sidecar": "required", "queries": ["roof"]}))
    (inbox / "r1.jpg").write_bytes(make_image(24, 24))
    with (inbox / "r1.json").open("w") as sidecar:
        sidecar.write('{"prompt": "half')
        sidecar.flush()
        time.sleep(0.6)  # longer than the settle delay
        sidecar.write(' and whole"}')
    job = until(lambda: inbox_jobs(service), what="the job")[0]
    assert job["params"]["prompt"] == "half and whole"
    assert not (inbox / "failed").exists()


def test_an_image_named_aip_keeps_the_folder_config_in_place(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    (inbox / "cfg").mkdir()
    (inbox / "cfg" / "aip.json").write_text(json.dumps({"queries": ["boat"]}))
    (inbox / "cfg" / "aip.jpg").write_bytes(make_image(25, 25))
    until(lambda: inbox_jobs(service), what="the job")
    assert (inbox / "cfg" / "aip.json").exists()
    (inbox / "cfg" / "next.jpg").write_bytes(make_image(26, 26))
    until(lambda: len(inbox_jobs(service)) == 2, what="two jobs")
    assert {j["params"]["queries"][0] for j in inbox_jobs(service)} == {"boat"}


def test_pruning_with_moving_off_does_not_requeue_files(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service(inbox_move=False, inbox_rescan_seconds=0.3)
    inbox = service.settings.inbox_dir
    (inbox / "kept.jpg").write_bytes(make_image(27, 27))
    job = until(lambda: inbox_jobs(service), what="the job")[0]
    service.wait(job["id"])
    pruned = service.client.post("/v1/prune", json={"older_than": "0s"}).json()
    assert pruned["jobs_removed"] == 1
    after_prune = time.time()

    def rescanned_twice() -> bool:
        scanned = service.client.get("/v1/inbox").json()["last_scan_at"] or 0
        return bool(scanned > after_prune + 0.4)  # at least one full rescan, then settling

    until(rescanned_twice, what="rescans after the prune")
    time.sleep(0.5)  # the settle delay for anything a rescan would have picked up
    assert inbox_jobs(service) == [] and (inbox / "kept.jpg").exists()
    assert service.client.get("/v1/inbox").json()["since_start"]["already_known"] >= 1
