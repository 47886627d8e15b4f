"""Jobs run as a batch: the same boxes and text as each run alone (batched reasoning through
mlx-vlm's batched generation, through the pipeline, through the real app), claimed in one
commit, and cancelled, timed out and failed one by one with every lease kept."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service import batching
from service.config import Settings
from service.models import gemma_batch
from service.models.host import ModelHost
from service.params import JobParams
from service.pipeline import Analysis, BatchItem, analyse, analyse_many
from service.store.migrate import migrate
from service.store.queue import ImageRecord, Queue
from tests.conftest import RunningService, gate_detector, make_image

Serve = Callable[..., RunningService]
PROMPTS = [
    "Describe the scene.",
    "An object detector found 2 objects\n1. car at [1, 2, 3, 4]\n\nWhat is here?",
    "x",
    "A much longer question, so that the rows of the batch differ in length and need padding.",
]


def _images() -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(make_image(320, 240))).convert("RGB"),
        # Plain: the tiny reasoner's text for it ends in a partial character, which the
        # single-job path drops (the batch must too).
        Image.new("RGB", (200, 300), (200, 10, 20)),
        Image.open(io.BytesIO(make_image(320, 240, color=(0, 0, 0)))).convert("RGB"),
        Image.open(io.BytesIO(make_image(320, 240, color=(9, 200, 0)))).convert("L"),
    ]


def _on_model_thread(host: ModelHost, fn: Callable[[Any, Any], Any]) -> Any:
    return asyncio.run(host.infer(fn))


# -- the pure rule --------------------------------------------------------------------------


def test_the_batch_setting_is_validated() -> None:
    assert batching.parse_setting(" AUTO ") == "auto"
    assert batching.parse_setting("4") == 4
    for bad in ("0", "-1", "two", "1.5", str(batching.MAX_BATCH + 1)):
        with pytest.raises(ValueError, match="whole number"):
            batching.parse_setting(bad)
    with pytest.raises(ValueError):
        Settings.from_env({"AIP_BATCH": "0"})
    assert Settings.from_env({"AIP_BATCH": "3"}).batch == 3


def test_auto_takes_the_measured_size_that_pays_for_itself() -> None:
    # Batching that buys little (CPU): stays at one.
    assert batching.best_measured({1: 1.0, 2: 1.05, 4: 1.07, 8: 1.02}) == 1
    # Throughput that keeps growing (GPU): the largest measured.
    assert batching.best_measured({1: 1.0, 2: 1.9, 4: 3.5, 8: 6.0}) == 8
    # Growing, then flat: where it stopped paying.
    assert batching.best_measured({1: 1.0, 2: 1.5, 4: 1.6, 8: 1.62}) == 2
    assert batching.best_measured({}) == 1
    with pytest.raises(ValueError):
        batching.best_measured({1: 1.0}, min_gain=0.5)


def test_auto_resolves_by_device_and_a_number_is_kept() -> None:
    assert batching.resolve("auto", on_cpu=True) == batching.CPU_DEFAULT
    assert batching.resolve("auto", on_cpu=False) == batching.GPU_DEFAULT
    assert batching.resolve("auto", on_cpu=True, measured={1: 1.0, 2: 2.0}) == 2
    assert batching.resolve(3, on_cpu=True) == 3
    with pytest.raises(ValueError):
        batching.resolve(0, on_cpu=True)


# -- the queue ------------------------------------------------------------------------------


def test_claim_many_takes_the_oldest_jobs_in_one_commit(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = tmp_path / "q.db"
        migrate(db)
        queue = await Queue.open(db)
        ids = []
        for i in range(3):
            sha = f"{i:064x}"
            image = ImageRecord(sha, 10, 8, 8, "PNG", f"images/{sha}.png")
            job_id, _ = await queue.enqueue(
                image, {"queries": ["car"], "prompt": "?"}, input_name="a"
            )
            ids.append(job_id)
        commits: list[str] = []
        await queue.read(lambda c: c.set_trace_callback(lambda s: commits.append(s)))
        claims = await queue.claim_many("w", 30.0, 2)
        assert [c.job_id for c in claims] == ids[:2]
        assert commits.count("COMMIT") == 1
        assert [c.attempt for c in claims] == [1, 1]
        rest = await queue.claim_many("w", 30.0, 8)
        assert [c.job_id for c in rest] == ids[2:]
        assert await queue.claim_many("w", 30.0, 8) == []
        # Each claim is fenced on its own: one ends, the others stay running.
        assert await queue.finish_cancelled(claims[0], "stop")
        counts = await queue.counts()
        assert counts["cancelled"] == 1 and counts["running"] == 2
        with pytest.raises(ValueError):
            await queue.claim_many("w", 30.0, 0)
        await queue.close()

    asyncio.run(scenario())


# -- the models and the pipeline ------------------------------------------------------------


def test_batched_reasoning_gives_each_job_the_text_it_gets_alone(
    model_host: ModelHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, limits = _images(), [24, 24, 7, 30]
    batches: list[int] = []
    real = gemma_batch.generate_rows

    def counted(reasoner: Any, imgs: Any, texts: Any, lims: Any) -> Any:
        batches.append(len(texts))
        return real(reasoner, imgs, texts, lims)

    monkeypatch.setattr(gemma_batch, "generate_rows", counted)

    def both(detector: Any, reasoner: Any) -> tuple[list[str], list[str]]:
        alone = [
            reasoner.reason(i, p, max_tokens=n)
            for i, p, n in zip(images, PROMPTS, limits, strict=True)
        ]
        return alone, gemma_batch.reason_many(reasoner, images, PROMPTS, limits)

    alone, together = _on_model_thread(model_host, both)
    assert together == alone
    assert sorted(batches) == [1, 3]  # one batch per image size: three of 320x240, one other
    assert any(alone)  # the tiny model says something: equal texts are not all empty


def test_analyse_many_gives_the_boxes_and_text_of_analyse(model_host: ModelHost) -> None:
    images = _images()[:3]
    jobs = [
        JobParams(("car", "roof"), PROMPTS[0], reason_max_tokens=20),
        JobParams(("person",), PROMPTS[1], detect_max_tokens=12),
        JobParams(("car",), PROMPTS[3]),
    ]

    def both(detector: Any, reasoner: Any) -> tuple[list[Analysis], list[Any]]:
        alone = [
            analyse(i, p, detector, reasoner, reason_tokens=16)
            for i, p in zip(images, jobs, strict=True)
        ]
        batch = analyse_many(
            [BatchItem(i, p) for i, p in zip(images, jobs, strict=True)],
            detector,
            reasoner,
            reason_tokens=16,
            reason_many=gemma_batch.reason_many,
        )
        return alone, batch

    alone, batch = _on_model_thread(model_host, both)
    for one, many in zip(alone, batch, strict=True):
        assert isinstance(many, Analysis)
        assert many.detections == one.detections
        assert many.reasoning == one.reasoning


def test_a_poisoned_job_fails_alone_in_the_pipeline(
    model_host: ModelHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _images()[:3]
    jobs = [JobParams(("car",), "fine"), JobParams(("car",), "poison"), JobParams(("car",), "ok")]
    stopped = JobParams(("car",), "stopped")

    def refuse(reasoner: Any, imgs: Any, texts: Any, lims: Any) -> Any:
        if any("poison" in t for t in texts):
            raise RuntimeError("the batch cannot run this")
        raise AssertionError("only the poisoned batch is expected here")

    monkeypatch.setattr(gemma_batch, "generate_rows", refuse)

    def stop_at_reason(stage: str) -> None:
        if stage == "reason":
            raise RuntimeError("stopped at its own checkpoint")

    def run(detector: Any, reasoner: Any) -> tuple[list[Any], list[Any]]:
        real_reason = reasoner.reason

        def reason(image: Any, prompt: str, **kw: Any) -> str:
            if "poison" in prompt:
                raise RuntimeError("this job's input breaks the reasoner")
            return str(real_reason(image, prompt, **kw))

        monkeypatch.setattr(reasoner, "reason", reason)
        items = [BatchItem(i, p) for i, p in zip(images, jobs, strict=True)]
        items.append(BatchItem(images[0], stopped, checkpoint=stop_at_reason))
        out = analyse_many(
            items, detector, reasoner, reason_tokens=12, reason_many=gemma_batch.reason_many
        )
        alone = [analyse(images[i], jobs[i], detector, reasoner, reason_tokens=12) for i in (0, 2)]
        return out, alone

    out, alone = _on_model_thread(model_host, run)
    assert isinstance(out[1], RuntimeError) and "breaks the reasoner" in str(out[1])
    assert isinstance(out[3], RuntimeError) and "own checkpoint" in str(out[3])
    for got, want in zip((out[0], out[2]), alone, strict=True):
        assert isinstance(got, Analysis)
        assert (got.detections, got.reasoning) == (want.detections, want.reasoning)


# -- through the real app -------------------------------------------------------------------


class Holds:
    """Hold the detector's first call (the lone first job), then its second (the batch)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first, self.second = threading.Event(), threading.Event()
        self.in_batch = threading.Event()

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == 1:
            return self.first.wait(timeout=60)
        if self.calls == 2:
            self.in_batch.set()
            return self.second.wait(timeout=60)
        return True


def _batch_of_three(
    service: RunningService, monkeypatch: pytest.MonkeyPatch, prompts: list[str]
) -> tuple[Holds, list[int]]:
    holds = Holds()
    gate = gate_detector(service, monkeypatch, hold=holds)
    service.submit(queries="car")
    assert gate.inside.wait(timeout=60)
    colours = [(200, 10, 20), (10, 200, 20), (10, 20, 200)]
    ids = [
        service.submit(make_image(color=c), queries="car", prompt=p).json()["id"]
        for c, p in zip(colours, prompts, strict=True)
    ]
    holds.first.set()
    assert holds.in_batch.wait(timeout=60)
    return holds, ids


def _result(job: dict[str, Any]) -> tuple[Any, Any]:
    return job["result"]["detections"], job["result"]["reasoning"]


def test_queued_jobs_run_as_a_batch_with_the_results_they_get_alone(
    tmp_path: Path, settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = ["What is here?", "poison", "Count the cars, please."]
    real_reason = gemma_batch.GemmaReasoner.reason

    def reason(self: Any, image: Any, prompt: str, **kw: Any) -> str:
        if "poison" in prompt:
            raise RuntimeError("this job's input breaks the reasoner")
        return real_reason(self, image, prompt, **kw)

    real_rows = gemma_batch.generate_rows

    def rows(reasoner: Any, imgs: Any, texts: Any, lims: Any) -> Any:
        if any("poison" in t for t in texts):
            raise RuntimeError("the batch cannot run this")
        return real_rows(reasoner, imgs, texts, lims)

    monkeypatch.setattr(gemma_batch.GemmaReasoner, "reason", reason)
    monkeypatch.setattr(gemma_batch, "generate_rows", rows)
    service = serve(settings.replace(batch=4, max_attempts=1))
    holds, ids = _batch_of_three(service, monkeypatch, prompts)
    holds.second.set()
    jobs = [service.wait(job_id) for job_id in ids]
    assert service.services.worker.batches[-1] == 3
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded"]
    assert jobs[1]["error"]["code"] == "model_error"
    assert "breaks the reasoner" in jobs[1]["error"]["message"]
    service.stop()

    # The same two jobs, one at a time, on a fresh service sharing the loaded models.
    alone_service = serve(settings.replace(data_dir=tmp_path / "alone", batch=1))
    colours = {0: (200, 10, 20), 2: (10, 20, 200)}
    for index, colour in colours.items():
        job_id = alone_service.submit(
            make_image(color=colour), queries="car", prompt=prompts[index]
        ).json()["id"]
        alone = alone_service.wait(job_id)
        assert alone["status"] == "succeeded"
        assert _result(alone) == _result(jobs[index])


def test_batched_jobs_keep_their_leases_and_are_cancelled_one_by_one(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease long enough that a loaded machine's stall of the event loop does not lose it.
    service = serve(settings.replace(batch=4, lease_seconds=1.0))
    holds, ids = _batch_of_three(service, monkeypatch, ["a?", "b?", "c?"])
    time.sleep(3.0)  # several lease lengths: only heartbeats keep them
    with sqlite3.connect(settings.database) as db:
        leases = db.execute(
            f"SELECT status, lease_until FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids
        ).fetchall()
    now = time.time()
    assert all(status == "running" and until > now for status, until in leases)
    shown = [service.client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    assert all(job["status"] == "running" and job["stage"] for job in shown)  # each its own
    assert service.client.post(f"/v1/jobs/{ids[1]}/cancel").status_code == 202
    holds.second.set()
    jobs = [service.wait(job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "cancelled", "succeeded"]
    assert all(j["attempts"] == 1 for j in jobs)


def test_batched_jobs_time_out_each_on_its_own_clock(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings.replace(batch=4, max_attempts=1))
    worker = service.services.worker
    holds = Holds()
    gate = gate_detector(service, monkeypatch, hold=holds)
    service.submit(queries="car")
    assert gate.inside.wait(timeout=60)
    # The lone first job keeps its clock; the jobs claimed next get a short one.
    monkeypatch.setattr(worker, "settings", worker.settings.replace(job_timeout_seconds=0.3))
    ids = [service.submit(make_image(color=(i, 9, 9)), queries="car").json()["id"] for i in (1, 2)]
    holds.first.set()
    assert holds.in_batch.wait(timeout=60)
    deadline = time.monotonic() + 30
    while not all(worker.running[i].flag.is_set() for i in ids if i in worker.running):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    holds.second.set()
    jobs = [service.wait(job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["failed", "failed"]
    assert all(j["error"]["code"] == "timeout" for j in jobs)
    assert worker.batches[-1] == 2


def test_a_batched_job_has_time_for_the_jobs_it_waits_on(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings.replace(batch=4, max_attempts=1))
    worker = service.services.worker
    first = threading.Event()
    calls: list[int] = []

    def hold() -> bool:
        calls.append(1)
        if len(calls) == 1:
            return first.wait(timeout=60)
        time.sleep(0.5)  # each batched job's detection: 1.5 s for the three, one at a time
        return True

    gate = gate_detector(service, monkeypatch, hold=hold)
    service.submit(queries="car")
    assert gate.inside.wait(timeout=60)
    # Each job's own work fits in 1 s; the three together do not.
    monkeypatch.setattr(worker, "settings", worker.settings.replace(job_timeout_seconds=1.0))
    ids = [
        service.submit(make_image(color=(i, 50, 9)), queries="car").json()["id"] for i in (1, 2, 3)
    ]
    first.set()
    jobs = [service.wait(job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, [j.get("error") for j in jobs]
    assert worker.batches[-1] == 3
