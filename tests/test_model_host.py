"""The model host on real tiny checkpoints through mlx-vlm, mostly over HTTP: swaps while jobs
arrive, the memory budget, unload recovery, keep-alive, quantised copies, staged loading.
Each test that changes models gets its own host; the session's shared one is left alone."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from service import cli
from service.errors import OverBudget
from service.models import budget, mlx_runtime, tiny
from service.models.host import ModelHost
from tests.conftest import RunningService, make_image, make_settings

Serve = Callable[..., RunningService]
IMAGE = make_image(96, 64)


@pytest.fixture(scope="module")
def spare(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second tiny reasoner (another seed) and one twice as wide (too big for tight budgets)."""
    root = tmp_path_factory.mktemp("spare")
    return {
        "other": tiny.build_reasoner(root / "gemma-seed-1", seed=1),
        "wide": tiny.build_reasoner(root / "gemma-wide", scale=2),
    }


@pytest.fixture
def own_host(tiny_checkpoints: tuple[Path, Path]) -> Iterator[Callable[..., ModelHost]]:
    """Fresh hosts over the tiny checkpoints, closed at the end of the test."""
    made: list[ModelHost] = []

    def make(**kw: Any) -> ModelHost:
        detector, reasoner = tiny_checkpoints
        made.append(ModelHost({"detector": str(detector), "reasoner": str(reasoner)}, **kw))
        return made[-1]

    yield make
    for host in made:
        asyncio.run(host.close())


def estimate(folder: Path) -> budget.Estimate:
    return budget.estimate_load(budget.read_tensors(folder), cpu=mlx_runtime.on_cpu())


def tight_budget(model_host: ModelHost, reasoner: Path) -> int:
    """Room for the detector and one tiny reasoner being loaded, not for two reasoners."""
    detector = model_host.roles["detector"].current
    assert detector is not None
    return detector.resident_bytes + estimate(reasoner).peak_bytes + 64 * 1024


def ready(service: RunningService) -> RunningService:
    deadline = time.monotonic() + 60
    while service.client.get("/v1/health").status_code != 200:
        assert time.monotonic() < deadline, service.client.get("/v1/health").json()
        time.sleep(0.05)
    return service


def role(service: RunningService, name: str) -> dict[str, Any]:
    report = service.client.get("/v1/models").json()
    return next(r for r in report["roles"] if r["role"] == name)


def until(service: RunningService, name: str, check: Callable[[dict[str, Any]], bool]) -> Any:
    deadline = time.monotonic() + 60
    while not check(current := role(service, name)):
        assert time.monotonic() < deadline, current
        time.sleep(0.02)
    return current


def active_bytes(service: RunningService) -> int:
    return int(service.client.get("/v1/models").json()["mlx"]["active_bytes"])


# --- pure arithmetic ---------------------------------------------------------------------------


def test_sizes_parse_and_the_budget_plan_beside_replace_evict_or_refuse() -> None:
    assert budget.parse_bytes("8G") == budget.parse_bytes("8GiB") == 8 * 2**30
    assert budget.parse_bytes("512m") == 512 * 2**20 and budget.parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        budget.parse_bytes("lots")
    need = budget.Estimate(weights_bytes=50, resident_bytes=100, peak_bytes=120)
    held = {"detector": 200, "reasoner": 100}
    plan = budget.plan_load("reasoner", "B", need, budget=420, resident=held)
    assert plan == budget.Plan(replace_first=False)
    plan = budget.plan_load("reasoner", "B", need, budget=400, resident=held)
    assert plan == budget.Plan(replace_first=True)
    plan = budget.plan_load(
        "reasoner", "B", need, budget=300, resident=held, evictable=("detector",)
    )
    assert plan == budget.Plan(replace_first=True, evict=("detector",))
    with pytest.raises(OverBudget) as refused:
        budget.plan_load("reasoner", "B", need, budget=300, resident=held)
    assert "120 bytes" in refused.value.message and "300 bytes" in refused.value.message
    assert "detector" in refused.value.message and "AIP_EVICT_IDLE" in refused.value.message


def test_the_header_estimate_is_what_the_reasoner_holds_once_loaded(model_host: ModelHost) -> None:
    reasoner = model_host.roles["reasoner"].current
    assert reasoner is not None
    assert estimate(reasoner.path).resident_bytes == reasoner.resident_bytes


def test_staged_loading_holds_one_chunk_beyond_the_final_size(
    tiny_checkpoints: tuple[Path, Path],
) -> None:
    path, chunk = tiny_checkpoints[1], 64 * 1024
    plain, _ = mlx_runtime.load(path)
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    staged = mlx_runtime.StagedLoad(path, chunk_bytes=chunk)
    fractions = [staged.fraction]
    while not staged.step():
        fractions.append(staged.fraction)
    resident = mlx_runtime.parameter_bytes(staged.model)
    assert len(fractions) > 5 and fractions == sorted(fractions) and staged.fraction == 1.0
    assert mx.get_peak_memory() - start <= resident + chunk  # never two copies of the weights
    ours, theirs = (
        dict(tree_flatten(staged.model.parameters())),
        dict(tree_flatten(plain.parameters())),
    )
    assert set(ours) == set(theirs)
    assert all(
        ours[k].dtype == theirs[k].dtype and mx.array_equal(ours[k], theirs[k]) for k in ours
    )


# --- over HTTP -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["beside", "replace_first"])
def test_swaps_while_jobs_keep_arriving_and_each_job_records_what_served_it(
    mode: str, tmp_path: Path, serve: Serve, own_host: Callable[..., ModelHost],
    model_host: ModelHost, tiny_checkpoints: tuple[Path, Path], spare: dict[str, Path],
) -> None:  # fmt: skip
    first, other = tiny_checkpoints[1], spare["other"]
    limit = tight_budget(model_host, first) if mode == "replace_first" else None
    service = ready(serve(make_settings(tmp_path), host=own_host(budget_bytes=limit)))
    revision = {"first": role(service, "reasoner")["revision"]}
    ids: list[int] = []
    stop = threading.Event()

    def submit() -> None:  # a steady stream of identical jobs, one queued behind the running one
        with httpx.Client(base_url=service.url, timeout=60) as client:

            def pending(job_id: int) -> bool:
                return client.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running")

            while not stop.is_set():
                while len(ids) >= 2 and pending(ids[-2]):
                    time.sleep(0.02)
                files = {"image": ("f.jpg", IMAGE, "image/jpeg")}
                answer = client.post("/v1/jobs", files=files, data={"queries": "car"})
                ids.append(answer.json()["id"])

    def finished(count: int) -> None:  # at least `count` more jobs done after this point
        target = len(ids) + count
        while len(ids) < target:
            time.sleep(0.02)
        service.wait(ids[target - 1])

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    try:
        finished(1)
        for name, folder in (("other", other), ("first", first)):
            answer = service.client.post("/v1/models/reasoner/load", json={"model": str(folder)})
            assert answer.status_code == 202, answer.text
            swapped = until(service, "reasoner", lambda r: r["state"] == "loaded")
            assert swapped["error"] is None and swapped["swap"] == mode
            revision[name] = swapped["revision"]
            finished(1)
    finally:
        stop.set()
        submitter.join(timeout=60)
    jobs = [service.wait(i) for i in ids]
    assert all(job["status"] == "succeeded" for job in jobs), [j["error"] for j in jobs]
    served = [job["models"]["reasoner"]["revision"] for job in jobs]
    runs = [r for i, r in enumerate(served) if i == 0 or served[i - 1] != r]
    assert runs == [revision["first"], revision["other"], revision["first"]]
    # Same input, greedy decoding: a job's text is its recorded model's text, and they differ.
    text = {job["models"]["reasoner"]["revision"]: job["result"]["reasoning"] for job in jobs}
    assert text[revision["first"]] != text[revision["other"]]
    assert all(job["result"]["reasoning"] == text[r] for job, r in zip(jobs, served, strict=True))


def test_an_over_budget_load_is_refused_with_both_numbers_and_nothing_is_unloaded(
    tmp_path: Path, serve: Serve, own_host: Callable[..., ModelHost],
    model_host: ModelHost, tiny_checkpoints: tuple[Path, Path], spare: dict[str, Path],
) -> None:  # fmt: skip
    limit = tight_budget(model_host, tiny_checkpoints[1])
    service = ready(serve(make_settings(tmp_path), host=own_host(budget_bytes=limit)))
    before = service.client.get("/v1/models").json()
    answer = service.client.post("/v1/models/reasoner/load", json={"model": str(spare["wide"])})
    assert answer.status_code == 409 and answer.json()["code"] == "over_budget"
    message = answer.json()["message"]
    assert f"{estimate(spare['wide']).peak_bytes} bytes" in message
    assert f"{limit} bytes" in message
    after = service.client.get("/v1/models").json()
    assert after["mlx"]["active_bytes"] == before["mlx"]["active_bytes"]
    for was, now in zip(before["roles"], after["roles"], strict=True):
        assert (now["state"], now["revision"], now["loads"]) == ("loaded", was["revision"], 1)
    assert after["roles"][1]["error"] == message  # reported where `aip models list` shows it
    assert service.wait(service.submit(queries="car").json()["id"])["status"] == "succeeded"


@pytest.mark.parametrize("budget_kind", ["roomy", "tight"])
def test_a_failed_load_leaves_the_old_model_serving_and_says_why(
    budget_kind: str, tmp_path: Path, serve: Serve, own_host: Callable[..., ModelHost],
    model_host: ModelHost, tiny_checkpoints: tuple[Path, Path],
) -> None:  # fmt: skip
    broken = shutil.copytree(tiny_checkpoints[1], tmp_path / "broken")
    weights = (broken / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", weights[:8])
    (broken / "model.safetensors").write_bytes(weights[: 8 + length + 1000])  # cut short
    limit = tight_budget(model_host, tiny_checkpoints[1]) if budget_kind == "tight" else None
    service = ready(serve(make_settings(tmp_path), host=own_host(budget_bytes=limit)))
    served = role(service, "reasoner")["revision"]
    answer = service.client.post(
        "/v1/models/reasoner/load", json={"model": str(broken), "wait": True}
    )
    assert answer.status_code == 422 and answer.json()["code"] == "model_load_failed"
    assert "exceeding the size of the file" in answer.json()["message"]
    now = role(service, "reasoner")
    assert now["state"] == "loaded" and now["revision"] == served
    assert now["error"] == answer.json()["message"].split("failed to load: ", 1)[1]
    job = service.wait(service.submit(queries="car").json()["id"])
    assert job["status"] == "succeeded" and job["models"]["reasoner"]["revision"] == served


@pytest.mark.parametrize("which", ["reasoner", "detector"])  # the detector holds a cycle
def test_unload_gives_mlx_memory_back_and_load_takes_it_again(
    which: str, tmp_path: Path, serve: Serve, own_host: Callable[..., ModelHost]
) -> None:
    service = ready(serve(make_settings(tmp_path), host=own_host()))
    assert service.client.post(f"/v1/models/{which}/unload").json()["state"] == "unloaded"
    before = active_bytes(service)
    loaded = service.client.post(f"/v1/models/{which}/load", json={"wait": True}).json()
    assert loaded["state"] == "loaded"
    assert active_bytes(service) - before == pytest.approx(loaded["resident_bytes"], rel=0.02)
    assert service.client.post(f"/v1/models/{which}/unload").json()["state"] == "unloaded"
    assert abs(active_bytes(service) - before) <= 0.01 * loaded["resident_bytes"]
    assert service.client.get("/v1/health").status_code == 200  # standing by, not failed


def test_keep_alive_unloads_an_idle_role_and_the_next_job_loads_it_again(
    tmp_path: Path, serve: Serve, tiny_checkpoints: tuple[Path, Path]
) -> None:
    detector, reasoner = tiny_checkpoints
    settings = make_settings(
        tmp_path, detector=str(detector), reasoner=str(reasoner), reasoner_keep_alive=0.2
    )
    service = ready(serve(settings, host=None))  # the service's own host, from its settings
    first = service.wait(service.submit(queries="car").json()["id"])
    assert first["status"] == "succeeded"
    idle = until(service, "reasoner", lambda r: r["state"] == "unloaded")
    assert idle["keep_alive"] == 0.2 and idle["resident_bytes"] is None
    assert role(service, "detector")["state"] == "loaded"  # pinned
    second = service.wait(service.submit(queries="car").json()["id"])
    assert second["status"] == "succeeded" and second["attempts"] == 1
    assert second["models"] == first["models"]
    assert role(service, "reasoner")["loads"] == idle["loads"] + 1


def test_quantize_4_converts_once_into_the_cache_and_every_later_load_reuses_it(
    tmp_path: Path, serve: Serve, tiny_checkpoints: tuple[Path, Path], model_host: ModelHost
) -> None:
    detector, reasoner = tiny_checkpoints
    settings = make_settings(tmp_path, detector=str(detector), reasoner=str(reasoner))
    service = ready(serve(settings, host=None))
    body = {"model": str(reasoner), "quantize": 4, "wait": True}
    loaded = service.client.post("/v1/models/reasoner/load", json=body).json()
    copy = Path(loaded["path"])
    assert copy.parent == settings.data_dir / "models" / "quantized"
    assert copy.name == f"{loaded['source_revision']}-q4" and "convert" in loaded["phases"]
    config = json.loads((copy / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    packed = [t for t in budget.read_tensors(copy) if t.name.endswith(".scales")]
    assert len(packed) >= 8  # the text model's layers really are 4-bit now
    full = model_host.roles["reasoner"].current
    assert full is not None and loaded["resident_bytes"] < full.resident_bytes / 2
    assert loaded["resident_bytes"] == loaded["estimate"]["resident_bytes"]
    job = service.wait(service.submit(queries="car").json()["id"])
    assert job["status"] == "succeeded"
    assert job["models"]["reasoner"] == {
        "id": str(reasoner), "revision": loaded["revision"], "quantize": 4
    }  # fmt: skip
    stamp = (copy / "model.safetensors").stat().st_mtime_ns
    service.client.post("/v1/models/reasoner/unload")
    again = service.client.post("/v1/models/reasoner/load", json=body).json()
    assert again["path"] == str(copy) and "convert" not in again["phases"]
    service.stop()

    restarted = ready(serve(settings.replace(reasoner_quantize=4), host=None))
    later = role(restarted, "reasoner")
    assert later["path"] == str(copy) and later["quantize"] == 4
    assert "convert" not in later["phases"]
    assert (copy / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_cli_lists_loads_with_progress_and_unloads(
    tmp_path: Path, serve: Serve, own_host: Callable[..., ModelHost], spare: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    service = ready(serve(make_settings(tmp_path), host=own_host()))
    url = ["--url", service.url]
    assert cli.main(["models", "load", "reasoner", str(spare["other"]), *url]) == 0
    out, err = capsys.readouterr()
    assert role(service, "reasoner")["revision"] in out and "reasoner: " in err
    assert cli.main(["models", "list", *url]) == 0
    out = capsys.readouterr().out
    assert "budget" in out and str(spare["other"]) in out
    assert cli.main(["models", "unload", "reasoner", *url]) == 0
    assert role(service, "reasoner")["state"] == "unloaded"
    assert service.client.post("/v1/models/planner/unload").json()["code"] == "not_found"


def test_health_is_ready_only_once_each_model_has_warmed_up(
    tmp_path: Path,
    serve: Serve,
    own_host: Callable[..., ModelHost],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each real model runs one small inference as it loads, before /v1/health turns ready:
    503 (the role loading, phase `warmup`) while it runs, 200 after, with each role's warm-up
    seconds among its phases. Once per load: a job after ready warms nothing up again."""
    from service.models import device, loading

    ran: list[str] = []
    inside, release = threading.Event(), threading.Event()
    real = loading.warm_up

    def held(name: str, runtime: Any) -> str:
        ran.append(name)
        if name == "detector":
            inside.set()
            release.wait(timeout=60)
        return real(name, runtime)

    monkeypatch.setattr(loading, "warm_up", held)
    service = serve(make_settings(tmp_path), host=own_host())
    try:
        assert inside.wait(timeout=60), "the detector was never warmed up"
        warming = service.client.get("/v1/health")
        assert warming.status_code == 503 and warming.json()["status"] == "loading"
        detector = next(m for m in warming.json()["models"] if m["role"] == "detector")
        assert detector["state"] == "loading" and detector["progress"]["phase"] == "warmup"
    finally:
        release.set()
    body = ready(service).client.get("/v1/health").json()
    assert ran == ["detector", "reasoner"]
    assert all(m["phases"]["warmup"] > 0 for m in body["models"])
    assert body["device"]["backend"] == device.backend()
    job = service.submit(queries="car").json()
    assert service.wait(job["id"])["status"] == "succeeded"
    assert ran == ["detector", "reasoner"]
