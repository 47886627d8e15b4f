"""A property-based fuzz of the whole OpenAPI document (schemathesis) against a real service over
HTTP: every operation gets generated valid and invalid input, no answer may be a 5xx and every
answer must match the schema documented for its status. Bounded: a few dozen examples per
operation and a time budget for the whole run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as fuzz_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from service.app import create_app
from service.worker import Worker
from tests.conftest import RunningService, make_image, make_settings

Serve = Callable[..., RunningService]

EXAMPLES_PER_OPERATION = 40
BUDGET_SECONDS = 100.0  # for the whole fuzz; operations past it run no more requests
TINY_IMAGE = make_image(24, 16, fmt="PNG")

# The document the service serves, from an app that is built but never started.
schema = schemathesis.openapi.from_dict(create_app(make_settings(Path("unused"))).openapi())
# Loading and unloading models acts on the model host the whole test session shares: a fuzzed
# unload would leave later tests without models, and a fuzzed load could start converting
# whatever folder it names. test_model_routes_answer_junk_with_4xx covers them instead.
schema = schema.exclude(path_regex=r"^/v1/models/\{role\}/(load|unload)$")
# The event stream's 200 is a body that never ends: tests/test_events.py covers the route.
schema = schema.exclude(path_regex=r"^/v1/events$")

_started: list[float] = []


def _budget_left() -> bool:
    if not _started:
        _started.append(time.monotonic())
    return time.monotonic() - _started[0] < BUDGET_SECONDS


@pytest.fixture
def fuzzed(serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunningService:
    """A service whose worker never starts, so submitted jobs stay queued and no inference
    runs; two jobs exist for the id routes to find."""
    monkeypatch.setattr(Worker, "start", lambda self: None)
    service = serve(make_settings(tmp_path))
    for width in (20, 21):
        assert service.submit(make_image(width, 16)).status_code == 202
    return service


@schema.parametrize()
@fuzz_settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,  # two shared cores: latency varies, and is not what this test is about
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one fresh service per operation, on purpose
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_no_operation_answers_5xx_or_off_schema(case: Any, fuzzed: RunningService) -> None:
    if not _budget_left():
        return
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("image"), bytes) and len(body["image"]) % 2:
        body["image"] = TINY_IMAGE  # some submissions carry a real (tiny) picture
    response = case.call(base_url=fuzzed.url, timeout=30)
    case.validate_response(
        response,
        checks=[not_a_server_error, response_schema_conformance, status_code_conformance],
    )


def test_model_routes_answer_junk_with_4xx(settings: Any, serve: Serve) -> None:
    service = serve(settings)
    host = service.services.host

    def picture() -> list[tuple[str, str, Any]]:
        return [(r["role"], r["state"], r["revision"]) for r in host.describe()]

    before = picture()
    for path, body in (
        ("/v1/models/nope/load", {}),
        ("/v1/models/nope/unload", None),
        ("/v1/models/detector/load", {"quantize": 3}),
        ("/v1/models/detector/load", {"quantize": "four"}),
        ("/v1/models/detector/load", {"model": 7}),
        ("/v1/models/detector/load", {"surprise": True}),
        ("/v1/models/detector/load", {"model": "\ud800"}),
        ("/v1/models/detector/load", []),
        ("/v1/models/%00/unload", None),
    ):
        kwargs: dict[str, Any] = {}
        if body is not None:
            # ensure_ascii writes a lone surrogate as its escape, as a client would.
            import json

            kwargs = {"content": json.dumps(body), "headers": {"content-type": "application/json"}}
        response = service.client.post(path, **kwargs)
        assert 400 <= response.status_code < 500, (path, body, response.text)
        assert response.json()["code"] and response.json()["message"]
    junk = service.client.post(
        "/v1/models/detector/load", content=b"\xff{", headers={"content-type": "application/json"}
    )
    assert junk.status_code == 422
    assert picture() == before
