"""The watched inbox with real files, the real watcher and a real SQLite ledger."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from service.config import Settings
from service.errors import StartupRefused
from service.models.host import ModelHost
from service.store.ledger import Ledger
from tests.conftest import (
    InstantDetector,
    InstantReasoner,
    RunningService,
    make_image,
    make_settings,
    until,
)
from tests.test_history import open_db


def ledger(settings: Settings) -> list[tuple[str, str, int | None]]:
    db = open_db(settings)
    try:
        rows = db.execute("SELECT relative_path, outcome, job_id FROM inbox_files ORDER BY id")
        return [tuple(row) for row in rows.fetchall()]
    finally:
        db.close()


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


def test_a_file_rewritten_at_the_same_size_while_it_settles_is_queued_as_rewritten(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service(inbox_settle_seconds=0.5)
    inbox = service.settings.inbox_dir
    first, last = (make_image(64, 48, fmt="BMP", color=c) for c in ((9, 9, 9), (250, 9, 9)))
    assert len(first) == len(last)  # uncompressed: the same size, other bytes
    (inbox / "same.bmp").write_bytes(first)
    time.sleep(0.3)  # seen and still for a few looks: read early
    (inbox / "same.bmp").write_bytes(last)
    jobs = until(lambda: inbox_jobs(service), what="a job")
    import hashlib

    assert [job["input"]["sha256"] for job in jobs] == [hashlib.sha256(last).hexdigest()]


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
    inbox_service: Callable[..., RunningService], database_url: str | None
) -> None:
    service = inbox_service(database_url=database_url)
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
    duplicate = next(r[0] for r in rows if r[1] == "duplicate")
    note = inbox / "processed" / f"{duplicate}.duplicate.json"
    until(note.exists, what="the duplicate note")
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == sorted(
        ["a.jpg", "copy of a.jpg", note.name]
    )
    said = json.loads(note.read_text())
    assert said["duplicate_of"] == rows[0][2]
    assert f"aip inbox reprocess processed/{duplicate}" in said["message"]


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
    # .aip.lock is the service's hold on the inbox, ignored like every hidden file
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == sorted([*ignored, ".aip.lock"])
    notes = json.loads((inbox / "failed" / "notes.txt.error.json").read_text())
    assert notes["code"] == "unsupported_type"
    fake = json.loads((inbox / "failed" / "fake.jpg.error.json").read_text())
    assert fake["code"] == "not_an_image" and fake["message"]
    assert (inbox / "failed" / "fake.jpg").read_text() == "text renamed to .jpg"
    assert [j["source_path"] for j in inbox_jobs(service)] == ["good.jpg"]
    assert service.client.get("/v1/inbox").json()["since_start"]["rejected"] == 2


def test_recent_lists_rejections_with_their_reasons_and_outlives_a_restart(
    inbox_service: Callable[..., RunningService],
) -> None:
    first = inbox_service()
    inbox = first.settings.inbox_dir
    (inbox / "fake.jpg").write_text("text renamed to .jpg")
    until((inbox / "failed" / "fake.jpg.error.json").exists, what="the error file")
    (inbox / "good.jpg").write_bytes(make_image(41, 41))
    job = until(lambda: inbox_jobs(first), what="the job")[0]
    until((inbox / "processed" / "good.jpg").exists, what="the filed image")
    first.stop()
    second = inbox_service()
    body = second.client.get("/v1/inbox").json()
    assert body["since_start"]["rejected"] == 0  # a new run: only the ledger remembers
    good, fake = body["recent"]  # newest first
    assert (good["path"], good["outcome"], good["job_id"]) == ("good.jpg", "queued", job["id"])
    assert good["code"] is None and good["message"] is None
    written = json.loads((inbox / "failed" / "fake.jpg.error.json").read_text())
    assert (fake["path"], fake["outcome"], fake["job_id"]) == ("fake.jpg", "rejected", None)
    assert (fake["code"], fake["message"]) == ("not_an_image", written["message"])
    assert fake["message"] and fake["at"] <= good["at"]


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


def fake_host() -> ModelHost:
    return ModelHost(
        {"detector": "fake", "reasoner": "fake"},
        loaders={"detector": lambda p: InstantDetector(), "reasoner": lambda p: InstantReasoner()},
        resolve_sources=False,
    )


def refusal(settings: Settings) -> StartupRefused:
    """What the real lifespan raises when it will not start with `settings`."""

    async def start() -> None:
        app = create_app(settings, host=fake_host())
        async with app.router.lifespan_context(app):
            raise AssertionError("the service started")

    with pytest.raises(StartupRefused) as refused:
        asyncio.run(start())
    return refused.value


def one_sentence(message: str) -> bool:
    return "\n" not in message and ". " not in message and "Traceback" not in message


def test_two_services_cannot_watch_one_inbox(
    tmp_path: Path, inbox_service: Callable[..., RunningService]
) -> None:
    first = inbox_service()
    inbox = first.settings.inbox_dir
    other = make_settings(tmp_path, data_dir=tmp_path / "other", inbox=inbox)
    with pytest.raises(RuntimeError, match="did not start"):
        inbox_service(data_dir=tmp_path / "other")  # under uvicorn, as `aip serve` runs it
    refused = refusal(other)
    assert str(inbox) in refused.message and str(first.settings.data_dir) in refused.message
    assert f"pid {os.getpid()}" in refused.message
    assert "--inbox" in refused.message and "AIP_INBOX_ENABLED=0" in refused.message
    assert one_sentence(refused.message)
    same_data = refusal(make_settings(tmp_path, inbox=tmp_path / "elsewhere"))
    assert "--data-dir" in same_data.message and one_sentence(same_data.message)
    (inbox / "once.jpg").write_bytes(make_image(53, 53))
    until(lambda: inbox_jobs(first), what="the job")
    time.sleep(0.5)  # a second watcher, had one started, would have made its job by now
    assert len(inbox_jobs(first)) == 1 and not other.database.exists()
    first.stop()
    second = inbox_service(data_dir=tmp_path / "other")  # the inbox is free again
    assert second.client.get("/v1/inbox").json()["enabled"] is True


def test_a_duplicate_is_processed_again_through_the_api(
    inbox_service: Callable[..., RunningService], database_url: str | None
) -> None:
    service = inbox_service(database_url=database_url)
    inbox = service.settings.inbox_dir
    data = make_image(54, 54)
    (inbox / "a.jpg").write_bytes(data)
    original = until(lambda: inbox_jobs(service), what="the job")[0]
    (inbox / "b.jpg").write_bytes(data)
    until((inbox / "processed" / "b.jpg.duplicate.json").exists, what="the duplicate note")
    response = service.client.post("/v1/inbox/reprocess", json={"path": "processed/b.jpg"})
    assert response.status_code == 202, response.text
    again = response.json()
    assert again["id"] != original["id"]
    assert response.headers["location"] == f"/v1/jobs/{again['id']}"
    assert again["source"] == "inbox" and again["source_path"] == "processed/b.jpg"
    assert again["input"]["sha256"] == original["input"]["sha256"]
    assert service.wait(again["id"])["status"] == "succeeded"
    absolute = str(inbox / "processed" / "a.jpg")
    assert service.client.post("/v1/inbox/reprocess", json={"path": absolute}).status_code == 202
    assert (inbox / "processed" / "b.jpg").exists()  # the file stays where it is
    assert len(inbox_jobs(service)) == 3
    assert service.client.get("/v1/inbox").json()["since_start"]["reprocessed"] == 2
    # The content's first job still owns it: a later plain copy is its duplicate.
    (inbox / "c.jpg").write_bytes(data)
    note = inbox / "processed" / "c.jpg.duplicate.json"
    until(note.exists, what="the third copy's note")
    assert json.loads(note.read_text())["duplicate_of"] == original["id"]


def test_a_sidecar_asks_for_a_duplicate_to_be_processed_again(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    data = make_image(55, 55)
    (inbox / "first.jpg").write_bytes(data)
    until(lambda: inbox_jobs(service), what="the first job")
    (inbox / "again.json").write_text(json.dumps({"reprocess": True, "prompt": "Once more"}))
    (inbox / "again.jpg").write_bytes(data)
    until(lambda: len(inbox_jobs(service)) == 2, what="a second job for the same bytes")
    again = next(j for j in inbox_jobs(service) if j["source_path"] == "again.jpg")
    assert again["params"]["prompt"] == "Once more"
    until((inbox / "processed" / "again.jpg").exists, what="filed")
    assert (inbox / "processed" / "again.json").exists()
    assert not (inbox / "processed" / "again.jpg.duplicate.json").exists()
    assert service.client.get("/v1/inbox").json()["since_start"]["reprocessed"] == 1
    # A whole folder cannot ask for it: only one file at a time, on purpose.
    (inbox / "all").mkdir()
    (inbox / "all" / "aip.json").write_text(json.dumps({"reprocess": True}))
    (inbox / "all" / "x.jpg").write_bytes(data)
    error = inbox / "failed" / "all" / "x.jpg.error.json"
    until(error.exists, what="refused")
    assert "unknown keys ['reprocess']" in json.loads(error.read_text())["message"]


def test_reprocess_is_confined_to_the_inbox(
    tmp_path: Path, inbox_service: Callable[..., RunningService]
) -> None:
    service = inbox_service()
    inbox = service.settings.inbox_dir
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(make_image(56, 56))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(make_image(57, 57))
    filed = inbox / "processed"
    filed.mkdir()
    os.symlink(secret, filed / "link.jpg")
    os.symlink(outside, filed / "sub")
    os.mkfifo(filed / "pipe.jpg")
    (filed / "notes.txt").write_text("not a picture")
    cases = {
        "../secret.jpg": (403, "path_not_allowed"),
        str(secret): (403, "path_not_allowed"),
        "processed/link.jpg": (403, "path_not_allowed"),
        "processed/sub/x.jpg": (403, "path_not_allowed"),
        "processed": (422, "not_a_regular_file"),
        "processed/pipe.jpg": (422, "not_a_regular_file"),
        "processed/none.jpg": (404, "file_not_found"),
    }
    for path, (status, code) in cases.items():
        response = service.client.post("/v1/inbox/reprocess", json={"path": path})
        assert (response.status_code, response.json()["code"]) == (status, code), path
        assert response.json()["message"]
    for body in ({"path": "notes.txt", "prompt": "x"}, ["processed/notes.txt"], {}):
        response = service.client.post("/v1/inbox/reprocess", json=body)
        assert response.status_code == 422 and response.json()["code"], body
    not_image = service.client.post("/v1/inbox/reprocess", json={"path": "processed/notes.txt"})
    assert 400 <= not_image.status_code < 500 and not_image.json()["message"]
    assert inbox_jobs(service) == []
    off = inbox_service(inbox_enabled=False, data_dir=tmp_path / "off")
    refused = off.client.post("/v1/inbox/reprocess", json={"path": "processed/notes.txt"})
    assert refused.status_code == 409 and "AIP_INBOX_ENABLED" in refused.json()["message"]


def test_rows_left_unfiled_by_a_crash_are_repaired_at_start(
    inbox_service: Callable[..., RunningService], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crash(self: Ledger, entry: Any, filed_to: str) -> None:
        raise OSError("the power went out before the move was recorded")

    monkeypatch.setattr(Ledger, "filed", crash)
    first = inbox_service()
    inbox = first.settings.inbox_dir
    data = make_image(58, 58)
    (inbox / "good.json").write_text(json.dumps({"prompt": "Sidecar"}))
    (inbox / "good.jpg").write_bytes(data)
    until(lambda: len(ledger(first.settings)) == 1, what="the first row")
    (inbox / "copy.jpg").write_bytes(data)
    (inbox / "notes.txt").write_text("not a picture")
    (inbox / "gone.jpg").write_bytes(make_image(59, 59))
    processed, failed = inbox / "processed", inbox / "failed"
    until(lambda: len(ledger(first.settings)) == 4, what="four rows")
    moved = ["good.jpg", "good.json", "copy.jpg", "copy.jpg.duplicate.json", "gone.jpg"]
    until(
        lambda: (
            all((processed / n).exists() for n in moved)
            and (failed / "notes.txt.error.json").exists()
        ),
        what="all moved",
    )
    jobs_before = len(inbox_jobs(first))
    first.stop()
    monkeypatch.undo()
    db = sqlite3.connect(first.settings.database)
    assert db.execute("SELECT count(*) FROM inbox_files WHERE filed_to IS NULL").fetchone()[0] == 4
    # The crash came before the notes were written and before the sidecar followed its file.
    (processed / "copy.jpg.duplicate.json").unlink()
    (failed / "notes.txt.error.json").unlink()
    (processed / "good.json").rename(inbox / "good.json")
    (processed / "gone.jpg").unlink()  # and the user took this one away since
    second = inbox_service()

    def filed() -> dict[str, str | None]:
        return dict(db.execute("SELECT relative_path, filed_to FROM inbox_files").fetchall())

    repaired = {
        "good.jpg": "processed/good.jpg",
        "copy.jpg": "processed/copy.jpg",
        "notes.txt": "failed/notes.txt",
        "gone.jpg": None,  # nowhere to be found: it keeps knowing the file, unfiled
    }
    # Rows are repaired one by one, in the order the files were first seen (not fixed).
    until(lambda: filed() == repaired, what="the repair")
    assert json.loads((failed / "notes.txt.error.json").read_text())["code"] == "unsupported_type"
    assert "duplicate_of" in json.loads((processed / "copy.jpg.duplicate.json").read_text())
    assert (processed / "good.json").exists() and not (inbox / "good.json").exists()
    assert len(inbox_jobs(second)) == jobs_before == 2


def test_unfinished_image_writes_are_removed_at_start(
    tmp_path: Path, inbox_service: Callable[..., RunningService]
) -> None:
    shard = tmp_path / "data" / "images" / "ab"
    shard.mkdir(parents=True)
    (shard / ".incoming-k2j4").write_bytes(b"half an image, then a crash")
    (shard / "ab12.jpg").write_bytes(make_image(20, 20))
    inbox_service()
    assert sorted(p.name for p in shard.iterdir()) == ["ab12.jpg"]


def test_inbox_error_files_speak_of_files_and_name_the_setting(
    inbox_service: Callable[..., RunningService],
) -> None:
    service = inbox_service(max_upload_bytes=2000)
    inbox = service.settings.inbox_dir
    (inbox / "big.jpg").write_bytes(make_image(300, 300))  # about 5 kB
    (inbox / "notes.txt").write_text("not a picture")
    big = inbox / "failed" / "big.jpg.error.json"
    notes = inbox / "failed" / "notes.txt.error.json"
    until(lambda: big.exists() and notes.exists(), what="both refused")
    too_large = json.loads(big.read_text())
    assert too_large["code"] == "payload_too_large"
    assert "AIP_MAX_UPLOAD_BYTES" in too_large["message"]
    for note in (inbox / "failed").glob("*.error.json"):
        message = json.loads(note.read_text())["message"]
        assert "upload" not in message and "file" in message, message
