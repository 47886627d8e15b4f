"""GET /metrics through the real app (uvicorn on 127.0.0.1, tiny checkpoints through mlx-vlm):
it parses as Prometheus text, moves when jobs run, keeps its label values bounded, and holds
the API's token rule. The event counting is also driven straight from a bus."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.events import EventBus
from service.metrics import Metrics
from tests.conftest import RunningService, gate_detector, make_settings

Serve = Callable[..., RunningService]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample, keyed by its name and labels; parsing fails loudly on a bad exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for n, key in samples if n == name and label in dict(key)}


def scrape(service: RunningService) -> Samples:
    response = service.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def test_metrics_move_when_jobs_run(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    before = scrape(service)
    assert value(before, "aip_queue_jobs", status="succeeded") == 0
    assert value(before, "aip_jobs_finished_total", outcome="succeeded") == 0
    for role in ("detector", "reasoner"):  # the tiny models are loaded: real bytes held
        assert value(before, "aip_model_resident_bytes", role=role) > 0
        assert value(before, "aip_model_state", role=role, state="loaded") == 1
        assert ("aip_model_load_seconds", frozenset({("role", role)})) in before
    assert ("aip_events_clients", frozenset()) in before

    gate = gate_detector(service, monkeypatch)
    running = service.submit(queries="car").json()
    assert gate.inside.wait(timeout=60)
    queued = service.submit(queries="car").json()
    during = scrape(service)
    assert value(during, "aip_queue_jobs", status="running") == 1
    assert value(during, "aip_queue_jobs", status="queued") == 1
    assert service.client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 200
    gate.release.set()
    assert service.wait(running["id"])["status"] == "succeeded"

    after = scrape(service)
    assert value(after, "aip_queue_jobs", status="succeeded") == 1
    assert value(after, "aip_queue_jobs", status="cancelled") == 1
    assert value(after, "aip_queue_jobs", status="running") == 0
    assert value(after, "aip_jobs_finished_total", outcome="succeeded") == 1
    assert value(after, "aip_jobs_finished_total", outcome="cancelled") == 1
    assert value(after, "aip_jobs_created_total", source="api") == 2
    for stage in ("queue_wait", "decode", "detect", "reason", "total"):
        name = "aip_job_stage_duration_seconds_count"
        assert value(after, name, stage=stage) == value(before, name, stage=stage) + 1, stage
    # The route's template, not the job's path; the submits and the polls were both timed.
    http = "aip_http_request_duration_seconds_count"
    assert value(after, http, method="POST", route="/v1/jobs", status="202") == 2
    assert value(after, http, method="GET", route="/v1/jobs/{job_id}", status="200") >= 1
    # A scrape is timed once its headers go out, after its own body was drawn.
    assert value(after, http, method="GET", route="/metrics", status="200") == 2
    assert value(after, http, method="POST", route="/v1/jobs/{job_id}/cancel", status="200") == 1
    segments = {part for route in labelled(after, http, "route") for part in route.split("/")}
    assert not any(part.isdigit() for part in segments), segments


def test_unknown_paths_and_methods_add_no_label_values(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    service.client.get("/metrics")
    known = labelled(scrape(service), "aip_http_request_duration_seconds_count", "route")
    for n in range(20):
        assert service.client.get(f"/no/such/{n}").status_code == 404
        assert service.client.get(f"/v1/jobs/{10_000 + n}").status_code == 404
    assert service.client.request("BREW", "/v1/jobs").status_code == 405
    samples = scrape(service)
    http = "aip_http_request_duration_seconds_count"
    routes = labelled(samples, http, "route")
    assert routes - known == {"unmatched", "/v1/jobs/{job_id}", "/v1/jobs"}
    assert value(samples, http, method="GET", route="unmatched", status="404") == 20
    assert value(samples, http, method="GET", route="/v1/jobs/{job_id}", status="404") == 20
    assert labelled(samples, http, "method") == {"GET", "other"}
    assert value(samples, http, method="other", route="/v1/jobs", status="405") == 1


def test_metrics_need_the_token_when_one_is_set(tmp_path: Path, serve: Serve) -> None:
    service = serve(make_settings(tmp_path, token="s3cret"))
    assert service.client.get("/metrics").status_code == 200  # the client sends the token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        refused = httpx.get(f"{service.url}/metrics", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthorized"
        assert "aip_" not in refused.text
    # The browser guard runs first here too: a foreign Host is refused, and that is timed.
    foreign = httpx.get(f"{service.url}/metrics", headers={"Host": "evil.example"})
    assert foreign.status_code == 403
    samples = scrape(service)
    http = "aip_http_request_duration_seconds_count"
    assert value(samples, http, method="GET", route="/metrics", status="401") == 3
    assert value(samples, http, method="GET", route="unmatched", status="403") == 1


def test_events_counted_from_the_bus_and_bad_ones_ignored() -> None:
    bus = EventBus()
    metrics = Metrics()

    class Host:
        def report(self) -> dict[str, object]:
            return {"held_bytes": 0, "budget_bytes": None, "roles": []}

    metrics.watch(bus, Host())
    bus.publish("inbox.filed", {"path": "a.jpg", "job_id": 1, "outcome": "queued"}, job_id=1)
    bus.publish("inbox.filed", {"path": "b.jpg", "job_id": 1, "outcome": "duplicate"}, job_id=1)
    bus.publish("inbox.rejected", {"path": "c.txt", "code": "not_an_image", "message": "no"})
    bus.publish("job.failed", {"code": "x", "message": "y", "retry_in": None}, job_id=2)
    bus.publish("job.retrying", {"code": "x", "message": "y", "retry_in": 4.0}, job_id=3)
    bus.publish("job.created", {"source": "../../etc", "input_name": "a"}, job_id=4)
    timings = {"detect": 12.5, "car, person": 3.0, "reason": float("nan"), "total": -1}
    bus.publish("job.succeeded", {"detections": 3, "timings_ms": timings}, job_id=5)
    bus.publish("job.succeeded", {"detections": "many", "timings_ms": ["not", "a", "dict"]})
    bus.publish("model.loaded", {"role": "somebody else"})
    bus.publish("model.loaded", {"role": "reasoner"})
    samples = parse(metrics.render({"queued": 2}).decode())
    assert value(samples, "aip_inbox_files_seen_total") == 3
    assert value(samples, "aip_inbox_files_queued_total") == 1
    assert value(samples, "aip_inbox_files_failed_total") == 1
    assert value(samples, "aip_jobs_finished_total", outcome="failed") == 1
    assert value(samples, "aip_jobs_finished_total", outcome="succeeded") == 2
    assert value(samples, "aip_job_retries_total") == 1
    assert value(samples, "aip_jobs_created_total", source="other") == 1
    assert value(samples, "aip_job_detections_total") == 3
    assert labelled(samples, "aip_job_stage_duration_seconds_count", "stage") == {"detect"}
    assert value(samples, "aip_job_stage_duration_seconds_sum", stage="detect") == 0.0125
    assert labelled(samples, "aip_model_loads_total", "role") == {"detector", "reasoner"}
    assert value(samples, "aip_model_loads_total", role="detector") == 0
    assert value(samples, "aip_model_loads_total", role="reasoner") == 1
    assert value(samples, "aip_queue_jobs", status="queued") == 2
    assert value(samples, "aip_events_clients") == 0
