"""The detection engine gives exactly what mlx-vlm's own `generate_perception` gives, token for
token and box for box: one query or several, batched or not, with the image's prefix shared
(and reused across calls) or every prompt prefilled whole.

The shipped tiny detector is wired so its one box hardly depends on the query or the image,
which would let a mixed-up row pass unnoticed. So most comparisons also run on a variant of
the session's loaded detector whose layers are amplified: there each query and image gives its
own box, some give none, and rows stop after different numbers of tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_vlm.models.falcon_perception import Model
from PIL import Image

from service.models import falcon
from service.models.falcon_engine import FalconEngine
from service.models.host import ModelHost
from service.params import JobParams
from service.pipeline import analyse

pytestmark = pytest.mark.slow
T = TypeVar("T")

QUERIES = ["car", "a red car", "person", "tree near the big building", "x", "", "boat", "roof"]
EIGHT = ["car", "tree near the big building", "car", "", "a red car", "x", "boat", "person"]
THREE = ["a red car", "x", "a red car"]  # a repeat, and queries of different lengths


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


IMAGES = {
    "noise": noise(320, 240),
    "small": noise(64, 48, seed=1),
    "flat": Image.new("RGB", (320, 240), (40, 120, 200)),
}


def on_models(host: ModelHost, fn: Callable[[falcon.FalconDetector], T]) -> T:
    """Run `fn(detector)` on the host's model thread, where its models live."""
    return asyncio.run(host.infer(lambda detector, _reasoner: fn(detector)))


class Recording(nn.Embedding):
    """The token table, noting every single token it embeds: generate_perception embeds each
    token it chooses (not the eos that ends it), so this reads its choices."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__(*base.weight.shape)
        self.weight = base.weight
        self.seen: list[int] = []

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape == (1, 1):
            self.seen.append(int(x.item()))
        return super().__call__(x)


def plain(model: Any, processor: Any, image: Image.Image, query: str, tokens: int) -> Any:
    """mlx-vlm's own call, with the tokens it chose."""
    inner = model.language_model.model
    base = inner.embed_tokens
    inner.embed_tokens = recording = Recording(base)
    try:
        found = model.generate_perception(
            processor, image=image, query=query, max_new_tokens=tokens
        )
    finally:
        inner.embed_tokens = base
    return found, recording.seen


def amplified(detector: falcon.FalconDetector) -> FalconEngine:
    """A second model with the detector's weights, its layers' outputs scaled up 20x."""
    model = Model(detector.model.config)
    weights = tree_flatten(detector.model.parameters())
    model.load_weights(
        [(k, v * 20 if k.endswith(("wo.weight", "w2.weight")) else v) for k, v in weights]
    )
    mx.eval(model.parameters())
    return FalconEngine(model, detector.processor)


@pytest.fixture(scope="module")
def engines(model_host: ModelHost) -> dict[str, FalconEngine]:
    def both(detector: falcon.FalconDetector) -> dict[str, FalconEngine]:
        return {"shipped": detector.engine, "amplified": amplified(detector)}

    return on_models(model_host, both)


def check(
    host: ModelHost,
    engine: FalconEngine,
    image: Image.Image,
    queries: list[str],
    tokens: int = 24,
    **options: Any,
) -> list[list[dict[str, Any]]]:
    """Assert the engine's detections and tokens equal the plain call's for every query."""

    def run(_detector: Any) -> tuple[Any, Any, Any]:
        expected = [plain(engine.model, engine.processor, image, q, tokens) for q in queries]
        found = engine.detect(image, queries, max_new_tokens=tokens, **options)
        return expected, found, engine.last_tokens

    expected, found, chosen = on_models(host, run)
    assert found == [boxes for boxes, _ in expected]
    assert chosen == [seen for _, seen in expected]
    return found


@pytest.mark.parametrize("model", ["shipped", "amplified"])
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_one_query_equals_generate_perception(
    model_host: ModelHost, engines: dict[str, FalconEngine], model: str, image: str
) -> None:
    for query in ("car", "tree near the big building", ""):
        check(model_host, engines[model], IMAGES[image], [query])
        check(model_host, engines[model], IMAGES[image], [query], share_prefix=False)


@pytest.mark.parametrize("queries", [THREE, EIGHT], ids=["3", "8"])
@pytest.mark.parametrize("max_batch", [1, 3, 8], ids=["one-row", "rows-of-3", "one-batch"])
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "whole-prompt"])
def test_several_queries_equal_one_call_each(
    model_host: ModelHost,
    engines: dict[str, FalconEngine],
    queries: list[str],
    max_batch: int,
    share_prefix: bool,
) -> None:
    options = {"max_batch": max_batch, "share_prefix": share_prefix}
    found = check(model_host, engines["amplified"], IMAGES["noise"], queries, **options)
    assert found[0] == found[2]  # the repeated query
    check(model_host, engines["amplified"], IMAGES["small"], queries, **options)


def test_outputs_differ_by_query_so_rows_cannot_mix_unseen(
    model_host: ModelHost, engines: dict[str, FalconEngine]
) -> None:
    found = check(model_host, engines["amplified"], IMAGES["noise"], QUERIES)
    assert len({repr(boxes) for boxes in found}) >= 4
    assert [] in found and any(found)  # some find nothing, others a box
    assert len({len(seen) for seen in engines["amplified"].last_tokens}) >= 2  # rows end apart


def test_a_prefix_is_reused_across_calls_unchanged(
    model_host: ModelHost, engines: dict[str, FalconEngine]
) -> None:
    engine = engines["amplified"]
    prefix = on_models(model_host, lambda _d: engine.encode(IMAGES["small"]))
    before = [np.array(part) for c in prefix.cache for part in c.state]
    first = on_models(model_host, lambda _d: engine.detect(prefix, QUERIES[:4], max_new_tokens=24))
    second = on_models(model_host, lambda _d: engine.detect(prefix, QUERIES, max_new_tokens=24))
    after = [np.array(part) for c in prefix.cache for part in c.state]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert second[:4] == first
    assert second == check(model_host, engine, IMAGES["small"], QUERIES)


def test_an_image_with_no_detections(
    model_host: ModelHost, engines: dict[str, FalconEngine]
) -> None:
    found = check(model_host, engines["amplified"], IMAGES["flat"], ["car", "person", "x"])
    assert found == [[], [], []]
    for tokens in (0, 1):  # stopped before a box has its size
        found = check(model_host, engines["shipped"], IMAGES["noise"], THREE, tokens=tokens)
        assert found == [[], [], []]


def test_detect_many_gives_the_detections_of_one_call_per_query(
    model_host: ModelHost,
) -> None:
    image = IMAGES["noise"]
    queries = ["car", "car <|image|>", "roof", "car"]  # the second is "car " once cleaned
    groups: list[list[str]] = []

    def run(detector: falcon.FalconDetector) -> tuple[Any, Any]:
        many = detector.detect_many(image, queries, max_new_tokens=24, on_group=groups.append)
        one = [detector.detect(image, q, max_new_tokens=24) for q in queries]
        return many, one

    many, one = on_models(model_host, run)
    assert many == one and [d.label for found in many for d in found] == queries
    assert groups == [["car", "car <|image|>", "roof"]]


class Calls:
    """The real detector, counting which of its entry points the pipeline uses."""

    def __init__(self, real: falcon.FalconDetector) -> None:
        self.real = real
        self.many: list[list[str]] = []

    def detect(self, image: Image.Image, query: str, **kw: Any) -> Any:
        raise AssertionError("the pipeline should detect all queries of an image at once")

    def detect_many(self, image: Image.Image, queries: Any, **kw: Any) -> Any:
        self.many.append(list(queries))
        return self.real.detect_many(image, queries, **kw)


class NoReasoning:
    def reason(self, image: Image.Image, prompt: str, *, max_tokens: int) -> str:
        return prompt


def test_the_pipeline_detects_an_image_once_for_all_its_queries(model_host: ModelHost) -> None:
    image = IMAGES["noise"]
    params = JobParams(("car", "roof", "boat"), "what is here?")
    stages: list[str] = []

    def run(detector: falcon.FalconDetector) -> tuple[Any, Any]:
        calls = Calls(detector)
        analysis = analyse(
            image, params, calls, NoReasoning(), detect_tokens=24, checkpoint=stages.append
        )
        expected = [d for q in params.queries for d in detector.detect(image, q, max_new_tokens=24)]
        return (analysis.detections, calls.many), expected

    (detections, many), expected = on_models(model_host, run)
    assert many == [list(params.queries)] and detections == expected
    assert stages[0] == "detect:car, roof, boat"


def test_every_prompt_is_the_shared_prefix_then_its_query(
    model_host: ModelHost, engines: dict[str, FalconEngine]
) -> None:
    engine = engines["shipped"]
    image = IMAGES["noise"]

    def run(_detector: Any) -> None:
        prefix = engine.encode(image)
        for query in QUERIES:
            processed = engine.processor(text=[query], images=[image], padding=False)
            ids = list(processed["input_ids"][0])
            assert engine.full_ids(prefix, query) == ids
            assert ids[: len(prefix.ids)] == prefix.ids and len(ids) > len(prefix.ids)

    on_models(model_host, run)
