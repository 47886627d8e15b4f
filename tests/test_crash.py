"""A real `aip serve` process killed with SIGKILL mid-job loses nothing and doubles nothing."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, make_image, start_process

pytestmark = pytest.mark.slow


def test_kill_9_mid_job_then_restart_finishes_every_job_once(
    tmp_path: Path, tiny_checkpoints: tuple[Path, Path]
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(data_dir, port, tiny_checkpoints)
    queries = ",".join(f"object {i}" for i in range(8))  # long enough to be caught running
    ids = []
    for i in range(3):
        files = {"image": (f"f{i}.jpg", make_image(64 + i, 64), "image/jpeg")}
        response = httpx.post(f"{url}/v1/jobs", files=files, data={"queries": queries})
        assert response.status_code == 202
        ids.append(response.json()["id"])
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/jobs/{ids[0]}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    process = start_process(data_dir, port, tiny_checkpoints)
    try:
        deadline = time.monotonic() + 300
        jobs = []
        for job_id in ids:
            while True:
                job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline
                time.sleep(0.1)
            jobs.append(job)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    killed = jobs[0]["attempt_history"]
    assert [a["outcome"] for a in killed] == ["lost", "succeeded"]
    assert killed[0]["error"]["code"] == "worker_lost"
    db = sqlite3.connect(data_dir / "aip.db")
    per_job = db.execute("SELECT job_id, count(*) FROM results GROUP BY job_id").fetchall()
    assert sorted(per_job) == [(i, 1) for i in ids]
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert process.returncode == 0, stderr[-3000:]  # SIGTERM is a clean stop
