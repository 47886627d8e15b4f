"""Aerial jobs end to end through the real app and the tiny checkpoints: a tiled frame, a
structured answer under constrained decoding, queries the reasoner plans, redaction of the
images handed out, and a default profile filling in a job."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import numpy as np
from PIL import Image

from service.config import Settings
from service.tiles import grid
from tests.conftest import RunningService, make_image, make_settings

Serve = Callable[..., RunningService]

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "kind": {"enum": ["car", "truck"]},
        "damaged": {"type": "boolean"},
    },
    "required": ["count", "kind", "damaged"],
    "additionalProperties": False,
}


def _png(width: int, height: int) -> bytes:
    return make_image(width, height, fmt="PNG")


def _done(service: RunningService, response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    return service.wait(response.json()["id"], timeout=300)


def test_a_large_frame_is_detected_tile_by_tile(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    tiling = {"size": 512, "overlap": 64, "full_frame": True}
    job = _done(
        service,
        service.submit(_png(1400, 1000), "big.png", queries="car", tiling=json.dumps(tiling)),
    )
    assert job["status"] == "succeeded", job
    report = job["result"]["tiling"]
    assert report["grid"] == [list(t) for t in grid((1400, 1000), 512, 64)]
    assert len(report["tile_ms"]) == len(report["grid"]) and report["full_frame_ms"] is not None
    for d in job["result"]["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 1400 and 0 <= y1 <= y2 <= 1000
    # A frame the detector takes whole is not tiled under `auto`.
    small = _done(service, service.submit(_png(640, 480), "small.png", queries="car"))
    assert small["status"] == "succeeded" and small["result"]["tiling"] is None


def test_a_structured_job_answers_json_valid_against_its_schema(
    tmp_path: Path, serve: Serve
) -> None:
    service = serve(make_settings(tmp_path, reason_max_tokens=200))
    job = _done(
        service,
        service.submit(queries="car", response_schema=json.dumps(SCHEMA), reason_max_tokens="200"),
    )
    assert job["status"] == "succeeded", job
    answer = job["result"]["answer"]
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(answer), answer
    assert json.loads(job["result"]["reasoning"]) == answer
    assert job["params"]["response_schema"] == SCHEMA


def test_an_unsatisfiable_schema_fails_the_job_and_a_malformed_one_is_refused(
    settings: Settings, serve: Serve
) -> None:
    service = serve(settings)
    never = {"allOf": [{"type": "string"}, {"type": "integer"}]}
    job = _done(service, service.submit(queries="car", response_schema=json.dumps(never)))
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "schema_unsatisfiable", job["error"]
    assert job["attempts"] == 1  # not worth a retry
    refused = service.submit(queries="car", response_schema='{"type": "no-such-type"}')
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_schema"
    after = service.client.get("/v1/health").json()
    assert after["status"] == "ok", after


def test_queries_are_planned_when_none_are_given(tmp_path: Path, serve: Serve) -> None:
    service = serve(make_settings(tmp_path, default_queries=()))
    job = _done(service, service.submit())
    assert job["status"] == "succeeded", job
    assert job["params"]["plan"] is True and job["params"]["queries"] == []
    planned = job["result"]["planned_queries"]
    assert planned and all(isinstance(q, str) and q for q in planned), planned
    assert {d["label"] for d in job["result"]["detections"]} <= set(planned)
    assert job["timings_ms"]["plan"] > 0


def test_redaction_blurs_the_detected_regions_of_every_image_handed_out(
    settings: Settings, serve: Serve
) -> None:
    service = serve(settings)
    original = _png(320, 240)
    job = _done(
        service,
        service.submit(original, "frame.png", queries="car", redact="car", keep_original="false"),
    )
    assert job["status"] == "succeeded", job
    boxes = [d["box"] for d in job["result"]["detections"] if d["label"] == "car"]
    assert boxes, "the tiny detector reports one box per query"
    served = service.client.get(f"/v1/jobs/{job['id']}/image")
    assert served.status_code == 200, served.text
    before = np.asarray(Image.open(io.BytesIO(original)).convert("RGB")).astype(int)
    after = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB")).astype(int)
    inside = np.zeros(before.shape[:2], dtype=bool)
    for x1, y1, x2, y2 in boxes:
        inside[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
    changed = (before != after).any(axis=2)
    assert not (changed & ~inside).any(), "a pixel outside the detected regions changed"
    assert changed[inside].any(), "nothing inside the detected regions changed"
    annotated = service.client.get(f"/v1/jobs/{job['id']}/annotated")
    assert annotated.status_code == 200
    # keep_original false: the stored original is gone once the redacted copy exists.
    shown = service.client.get(f"/v1/jobs/{job['id']}").json()
    assert shown["input"]["stored"] is False
    assert not (settings.data_dir / "images").exists() or not any(
        p.is_file() for p in (settings.data_dir / "images").rglob("*")
    )
    # A follow-up still has an image to look at: the redacted copy.
    asked = service.client.post(f"/v1/jobs/{job['id']}/ask?wait=60", json={"question": "Cars?"})
    assert asked.status_code == 200 and asked.json()["status"] == "succeeded", asked.text


def test_the_default_profile_fills_in_what_the_job_leaves_out(
    settings: Settings, serve: Serve
) -> None:
    service = serve(settings)
    profile = {"queries": ["roof"], "prompt": "Any damage?", "set_of_marks": True}
    put = service.client.put("/v1/profiles/roofs", json={"params": profile})
    assert put.status_code in (200, 201), put.text
    chosen = service.client.put("/v1/profiles/roofs/default")
    assert chosen.status_code in (200, 204), chosen.text
    job = _done(service, service.submit())
    assert job["status"] == "succeeded", job
    params = job["params"]
    assert params["profile"] == "roofs" and params["queries"] == ["roof"]
    assert params["prompt"] == "Any damage?" and params["set_of_marks"] is True
    # The job's own fields win over the profile's.
    own = _done(service, service.submit(queries="car"))
    assert own["params"]["queries"] == ["car"] and own["params"]["profile"] == "roofs"
