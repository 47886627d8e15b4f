"""Pure parts of the pipeline and policy: parameters, prompt, orchestration, backoff."""

from __future__ import annotations

import random
from typing import Any

import pytest
from PIL import Image

from service.detection import Detection
from service.errors import InvalidInput, JobFailure
from service.grounding import grounded_prompt
from service.params import build_params, parse_queries
from service.pipeline import analyse
from service.policy import backoff_seconds, classify

LIMITS = {
    "default_queries": ["car"],
    "default_prompt": "Describe.",
    "max_queries": 3,
    "max_prompt_chars": 50,
}


def test_queries_repeatable_or_comma_separated_deduplicated() -> None:
    assert parse_queries(["car, truck", "person", " "]) == ["car", "truck", "person"]
    params = build_params(["car,car", "boat"], None, **LIMITS)
    assert params.queries == ("car", "boat") and params.prompt == "Describe."


@pytest.mark.parametrize(
    ("queries", "prompt"),
    [(["a,b,c,d"], None), (["x" * 201], None), (None, "p" * 51)],
    ids=["too-many", "too-long-query", "too-long-prompt"],
)
def test_params_outside_limits_are_refused(queries: list[str] | None, prompt: str | None) -> None:
    with pytest.raises(InvalidInput):
        build_params(queries, prompt, **LIMITS)


def test_reasoning_prompt_numbers_detections_as_stored() -> None:
    boxes = [
        Detection("car", (1, 2, 30, 40), (100, 80)),
        Detection("roof", (0, 0, 5, 5), (100, 80)),
    ]
    text = grounded_prompt("How many cars?", boxes, (100, 80))
    assert "1. car at [1, 2, 30, 40]" in text and "2. roof at [0, 0, 5, 5]" in text
    assert text.endswith("How many cars?") and "100x80" in text
    assert "no objects" in grounded_prompt("Q", [], (100, 80))


class FakeDetector:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def detect(self, image: Image.Image, query: str, **kw: Any) -> list[Detection]:
        self.calls.append(query)
        return [Detection(query, (0, 0, 1, 1), image.size)]


class FakeReasoner:
    def __init__(self) -> None:
        self.prompts: list[str] = []

    def reason(self, image: Image.Image, prompt: str, **kw: Any) -> str:
        self.prompts.append(prompt)
        return "fine"


def test_analyse_runs_each_query_then_reasons_once() -> None:
    detector, reasoner = FakeDetector(), FakeReasoner()
    params = build_params(["a", "b"], "Q?", **LIMITS)
    result = analyse(Image.new("RGB", (8, 8)), params, detector, reasoner)
    assert detector.calls == ["a", "b"] and len(reasoner.prompts) == 1
    assert [d.label for d in result.detections] == ["a", "b"]
    assert set(result.timings) == {"detect", "reason"}


def test_checkpoint_can_stop_between_stages() -> None:
    detector, reasoner = FakeDetector(), FakeReasoner()
    params = build_params(["a", "b"], "Q?", **LIMITS)

    def stop_before_b(stage: str) -> None:
        if stage == "detect:b":
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        analyse(Image.new("RGB", (8, 8)), params, detector, reasoner, checkpoint=stop_before_b)
    assert detector.calls == ["a"] and reasoner.prompts == []


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rand = random.Random(1)
    samples = [max(backoff_seconds(n, rand=rand) for _ in range(200)) for n in (1, 2, 3, 12)]
    assert samples[0] <= 2 and samples[1] <= 4 and samples[2] <= 8 and samples[3] <= 300
    assert samples[0] < samples[1] < samples[2] < samples[3]
    assert samples[3] > 200


def test_classify_marks_model_errors_transient_and_keeps_job_failures() -> None:
    assert classify(RuntimeError("metal died")).transient
    assert classify(RuntimeError("metal died")).code == "model_error"
    assert classify(MemoryError()).code == "out_of_memory"
    permanent = JobFailure("corrupt_image", "x", transient=False)
    assert classify(permanent) is permanent


def test_detection_from_center_size_clips_to_the_image() -> None:
    d = Detection.from_center_size("car", (0.95, 0.5), (0.2, 0.5), (200, 100))
    assert d.box == pytest.approx((170.0, 25.0, 200.0, 75.0))
    assert d.normalized_box == pytest.approx((0.85, 0.25, 1.0, 0.75))
