"""Generation limits: AIP_DETECT_MAX_TOKENS / AIP_REASON_MAX_TOKENS as settings, and per job
within them, through the real app and the tiny checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.config import Settings
from service.detection import Detection
from service.params import JobParams
from service.pipeline import analyse
from tests.conftest import RunningService, gate_detector, make_image, make_settings
from tests.test_cli import run

Serve = Callable[..., RunningService]

# The tiny detector decodes <|coord|> <|size|> <|seg|> per box: one token ends it before any.
NO_BOX, FEW = 1, 5


class Spy:
    """The real reasoner, noting the token limit of each call (its random-weight text is
    often empty, so its length cannot show the limit)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.limits: list[int] = []

    def reason(self, image: Image.Image, prompt: str, *, max_tokens: int) -> str:
        self.limits.append(max_tokens)
        return str(self.real.reason(image, prompt, max_tokens=max_tokens))


def spy_reasoner(service: RunningService, monkeypatch: pytest.MonkeyPatch) -> Spy:
    state = service.services.host.roles["reasoner"]
    spy = Spy(state.runtime)
    monkeypatch.setattr(state, "runtime", spy)
    return spy


def test_a_jobs_limits_are_stored_shown_and_bound_the_models_output(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    spy = spy_reasoner(service, monkeypatch)
    image = make_image(320, 240)
    plain = service.submit(image, queries="car, person")
    limited = service.submit(
        image, queries="car, person", detect_max_tokens=str(NO_BOX), reason_max_tokens=str(FEW)
    )
    assert plain.status_code == 202 and limited.status_code == 202, limited.text
    assert limited.json()["id"] != plain.json()["id"]  # other limits: another request
    params = limited.json()["params"]
    assert (params["detect_max_tokens"], params["reason_max_tokens"]) == (NO_BOX, FEW)
    defaults = plain.json()["params"]
    assert defaults["detect_max_tokens"] == settings.detect_max_tokens
    assert defaults["reason_max_tokens"] == settings.reason_max_tokens

    full, short = service.wait(plain.json()["id"]), service.wait(limited.json()["id"])
    assert full["status"] == short["status"] == "succeeded", (full, short)
    assert full["result"]["detections"] and short["result"]["detections"] == []
    assert spy.limits == [settings.reason_max_tokens, FEW]
    assert short["params"] == params  # as stored, on the finished job too


def test_a_retried_job_runs_with_the_limits_it_was_submitted_with(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    spy = spy_reasoner(service, monkeypatch)
    first = service.submit(queries="car")
    assert gate.inside.wait(timeout=60)
    held = service.submit(queries="car", detect_max_tokens=str(NO_BOX), reason_max_tokens="3")
    job_id = held.json()["id"]
    cancel = service.client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancel.json()["status"] == "cancelled"
    gate.release.set()
    assert service.wait(first.json()["id"])["status"] == "succeeded"

    assert service.client.post(f"/v1/jobs/{job_id}/retry").status_code == 202
    done = service.wait(job_id)
    assert done["status"] == "succeeded", done
    assert (done["params"]["detect_max_tokens"], done["params"]["reason_max_tokens"]) == (1, 3)
    assert done["result"]["detections"] == [] and spy.limits[-1] == 3


@pytest.mark.parametrize("field", ["detect_max_tokens", "reason_max_tokens"])
def test_limits_outside_one_to_the_setting_are_refused_with_the_rule(
    tmp_path: Path, serve: Serve, field: str
) -> None:
    allowed = tmp_path / "drops"
    allowed.mkdir()
    (allowed / "frame.png").write_bytes(make_image(50, 40, fmt="PNG"))
    settings = make_settings(
        tmp_path, detect_max_tokens=40, reason_max_tokens=40, allowed_dirs=(allowed,)
    )
    service = serve(settings)
    setting = f"AIP_{field.upper()}"
    for bad in ("0", "41", "-3", "abc", "2.5", "1e3"):
        refused = service.submit(queries="car", **{field: bad})
        assert refused.status_code == 422, (bad, refused.text)
        body = refused.json()
        assert body["code"] == "invalid_option", body
        assert f"{field} must be a whole number from 1 to 40" in body["message"], body
        assert setting in body["message"] and "default and ceiling" in body["message"]
    path = str(allowed / "frame.png")
    for bad_json in (0, 41, True, 2.5, "many", [3], None):
        refused = service.client.post("/v1/jobs", json={"path": path, field: bad_json})
        if bad_json is None:  # null: not given
            assert refused.status_code == 202, refused.text
            assert refused.json()["params"][field] == 40
            continue
        assert refused.status_code == 422, (bad_json, refused.text)
        assert refused.json()["code"] == "invalid_option"
    edge = service.client.post("/v1/jobs", json={"path": path, field: 40, "queries": ["x"]})
    assert edge.status_code == 202 and edge.json()["params"][field] == 40


def test_the_settings_are_read_from_the_environment_and_bad_values_named() -> None:
    read = Settings.from_env({"AIP_DETECT_MAX_TOKENS": "32", "AIP_REASON_MAX_TOKENS": "512"})
    assert (read.detect_max_tokens, read.reason_max_tokens) == (32, 512)
    plain = Settings.from_env({})
    assert (plain.detect_max_tokens, plain.reason_max_tokens) == (256, 256)
    for key in ("AIP_DETECT_MAX_TOKENS", "AIP_REASON_MAX_TOKENS"):
        for bad in ("0", "-1", "many", "2.5", "32769", "99999999999999999999999"):
            with pytest.raises(ValueError) as refused:
                Settings.from_env({key: bad})
            assert str(refused.value) == f"{key}={bad!r}: use a whole number from 1 to 32768"
        assert Settings.from_env({key: "32768"}) is not None
    with pytest.raises(ValueError, match="detect_max_tokens must be from 1 to 32768"):
        Settings(detect_max_tokens=0)


def test_a_bad_limit_setting_stops_the_command_with_one_sentence(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIP_REASON_MAX_TOKENS", "lots")
    code, out, err = run(capsys, "jobs")
    assert code == 2 and out == ""
    assert err.strip() == "aip: AIP_REASON_MAX_TOKENS='lots': use a whole number from 1 to 32768"


def test_aip_submit_sends_the_limits(
    settings: Settings, serve: Serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    service = serve(settings)
    picture = tmp_path / "frame.jpg"
    picture.write_bytes(make_image(64, 48))
    code, out, _ = run(
        capsys,
        "submit",
        str(picture),
        "--detect-max-tokens",
        "1",
        "--reason-max-tokens",
        "4",
        "--json",
        "--url",
        service.url,
    )
    assert code == 0, out
    params = json.loads(out)["params"]
    assert (params["detect_max_tokens"], params["reason_max_tokens"]) == (1, 4)
    code, out, err = run(
        capsys, "submit", str(picture), "--reason-max-tokens", "99999", "--url", service.url
    )
    assert code == 1 and "reason_max_tokens must be a whole number from 1 to 24" in out + err


class Recorder:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def detect(self, image: Image.Image, query: str, *, max_new_tokens: int) -> list[Detection]:
        self.asked.append(max_new_tokens)
        return []

    def reason(self, image: Image.Image, prompt: str, *, max_tokens: int) -> str:
        self.asked.append(max_tokens)
        return ""


def test_a_job_stored_before_limits_runs_with_the_settings_values() -> None:
    old = JobParams.from_dict({"queries": ["car"], "prompt": "what?", "options": {}})
    assert old.detect_max_tokens is None and old.reason_max_tokens is None
    assert "detect_max_tokens" not in old.to_dict()  # nothing invented for it
    models = Recorder()
    image = Image.new("RGB", (8, 8))
    analyse(image, old, models, models, detect_tokens=7, reason_tokens=9)
    new = JobParams.from_dict({**old.to_dict(), "detect_max_tokens": 2, "reason_max_tokens": 3})
    analyse(image, new, models, models, detect_tokens=7, reason_tokens=9)
    assert models.asked == [7, 9, 2, 3]
