"""Structured answers: schema checks and answer parsing (pure), the CPU mask of constrained
decoding against llguidance's own, and the real tiny reasoner constrained to schemas, refusing
unsatisfiable ones, proposing query plans and reasoning over several images."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Callable
from typing import Any, cast

import pytest
from PIL import Image

from service.errors import InvalidInput, JobFailure
from service.models.host import ModelHost
from service.structured import (
    MAX_SCHEMA_BYTES,
    PLAN_PROMPT,
    PLAN_SCHEMA,
    check_schema,
    parse_answer,
    parse_plan,
)
from tests.conftest import make_image

SURVEY = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["car", "truck", "none"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "flooded": {"type": "boolean"},
    },
    "required": ["kind", "count", "flooded"],
    "additionalProperties": False,
}
UNSATISFIABLE = (
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"allOf": [{"type": "string"}, {"type": "integer"}]},
    # A valid schema whose regex llguidance cannot run (no look-behind): unusable all the same.
    {"type": "string", "pattern": "(?<=a)b"},
)
NAME = re.compile(PLAN_SCHEMA["items"]["pattern"])


def picture(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.open(io.BytesIO(make_image(width, height, color=color))).convert("RGB")


def on_model_thread(host: ModelHost, fn: Callable[[], Any]) -> Any:
    return asyncio.run(host.thread.run(fn))


# -- check_schema -----------------------------------------------------------------------------


def test_a_schema_is_taken_as_a_dict_or_as_json_text() -> None:
    assert check_schema(SURVEY) == SURVEY
    assert check_schema(json.dumps(SURVEY)) == SURVEY
    assert check_schema(json.dumps(SURVEY).encode()) == SURVEY
    assert check_schema(PLAN_SCHEMA) == PLAN_SCHEMA
    drafted = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "integer"}
    assert check_schema(drafted) == drafted


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (["type", "object"], "JSON object"),
        ("3", "JSON object"),
        (None, "JSON object"),
        ({"type": "strin"}, "/type"),
        ({"type": ["string", "colour"]}, "/type"),
        ({"properties": []}, "/properties"),
        ({"type": "object", "properties": {"a": {"minimum": "low"}}}, "/properties/a/minimum"),
        ('{"type": "object"', "not valid JSON"),
        ("{'type': 'object'}", "not valid JSON"),
        ('{"type": "number", "minimum": NaN}', "plain JSON"),
        ({"type": "string", "pattern": "(("}, "/pattern"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"$ref": "http://127.0.0.1:9/schema.json"}, "schema"),
        ({"$schema": "http://127.0.0.1:9/meta#"}, "$schema"),
        ({"description": "x" * MAX_SCHEMA_BYTES}, f"{MAX_SCHEMA_BYTES} bytes"),
        (json.dumps({"description": "x" * MAX_SCHEMA_BYTES}), f"{MAX_SCHEMA_BYTES} bytes"),
        ("[" * 5000 + "]" * 5000, "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_malformed_schemas_are_refused_with_invalid_schema(raw: Any, why: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_schema(raw)
    assert caught.value.code == "invalid_schema"
    assert caught.value.status == 422
    assert why in caught.value.message


def test_a_deeply_nested_schema_is_refused_before_any_validator_walks_it() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(200):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidInput) as caught:
        check_schema(schema)
    assert caught.value.code == "invalid_schema" and "deeper" in caught.value.message


# -- parse_answer / parse_plan ----------------------------------------------------------------


def test_an_answer_is_json_valid_against_its_schema() -> None:
    text = ' {"kind": "car", "count": 3, "flooded": false}\n'
    assert parse_answer(text, SURVEY) == {"kind": "car", "count": 3, "flooded": False}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"kind": "boat", "count": 3, "flooded": false}', "/kind"),
        ('{"kind": "car", "count": 30, "flooded": false}', "/count"),
        ('{"kind": "car", "count": 3}', "flooded"),
        ('{"kind": "car", "count": 3, "flooded": "no"}', "/flooded"),
        ('{"kind": "car", "count": 3, "flooded": false, "extra": 1}', "extra"),
        ("", "empty"),
        ("There are three cars.", "not JSON"),
        ('{"kind": "car"} and more', "not JSON"),
        ('{"kind": "car", "count": NaN, "flooded": false}', "not JSON"),
        ('{"kind": "car", "cou', "ran out of tokens"),
        ('{"kind": "car", "count": 3, ', "ran out of tokens"),
    ],
)
def test_an_invalid_answer_fails_the_job_with_answer_invalid(text: str, why: str) -> None:
    with pytest.raises(JobFailure) as caught:
        parse_answer(text, SURVEY)
    assert caught.value.code == "answer_invalid"
    assert caught.value.transient is False
    assert why in caught.value.message


def test_a_plan_is_tidied_deduplicated_and_kept_when_cut_short() -> None:
    assert parse_plan('["car", "person", "car"]') == ["car", "person"]
    assert parse_plan('["car ", "solar  panel"]') == ["car", "solar panel"]
    assert parse_plan('["car", "roof", "pers') == ["car", "roof"]
    for bad in (
        "[]",
        '["Car"]',
        '{"car": 1}',
        '["',
        "cars and people",
        json.dumps(["a"] * 7 + list("bcdefg")),
    ):
        with pytest.raises(JobFailure) as caught:
            parse_plan(bad)
        assert caught.value.code == "answer_invalid"


# -- the CPU mask -----------------------------------------------------------------------------


def test_the_cpu_mask_allows_exactly_the_tokens_llguidance_allows() -> None:
    import mlx.core as mx
    import numpy as np
    from llguidance.numpy import apply_token_bitmask_inplace

    from service.models.constrained import apply_mask

    rng = np.random.default_rng(7)
    for vocab, words in ((375, 12), (64, 2), (100, 3), (70, 2)):  # words*32 above/equal/below
        packed = rng.integers(-(2**31), 2**31, size=(2, words), dtype=np.int64).astype(np.int32)
        logits = rng.standard_normal((2, vocab)).astype(np.float32)
        expected = logits.copy()
        apply_token_bitmask_inplace(expected, packed)
        got = np.array(apply_mask(mx.array(logits), mx.array(packed)))
        assert np.array_equal(got, expected)
        one = np.array(apply_mask(mx.array(logits[0]), mx.array(packed[0])))
        assert np.array_equal(one[0], expected[0])


# -- the real tiny reasoner -------------------------------------------------------------------


def test_constrained_answers_parse_and_validate(model_host: ModelHost) -> None:
    reasoner = model_host.roles["reasoner"].runtime

    def run() -> list[str]:
        return [
            reasoner.reason(image, prompt, max_tokens=120, schema=SURVEY)
            for image, prompt in (
                (picture(320, 240, (40, 120, 200)), "How many cars, and is it flooded?"),
                (picture(200, 310, (200, 60, 20)), "1. car at [1, 2, 30, 40]\n\nDescribe."),
            )
        ]

    for text in on_model_thread(model_host, run):
        answer = parse_answer(text, SURVEY)
        assert answer["kind"] in ("car", "truck", "none")
        assert isinstance(answer["count"], int) and not isinstance(answer["count"], bool)
        assert 0 <= answer["count"] <= 20
        assert isinstance(answer["flooded"], bool)


def test_a_plan_from_the_reasoner_parses_into_names(model_host: ModelHost) -> None:
    reasoner = model_host.roles["reasoner"].runtime
    image = picture(320, 240, (90, 160, 60))

    def run() -> tuple[str, str]:
        whole = reasoner.reason(image, PLAN_PROMPT, max_tokens=400, schema=PLAN_SCHEMA)
        short = reasoner.reason(image, PLAN_PROMPT, max_tokens=64, schema=PLAN_SCHEMA)
        return whole, short

    whole, short = on_model_thread(model_host, run)
    assert isinstance(json.loads(whole), list)  # complete: the grammar closed the array
    for text in (whole, short):  # cut at 64 tokens, the complete names still come back
        names = parse_plan(text)
        assert 1 <= len(names) <= 6 and len(set(names)) == len(names)
        assert all(NAME.fullmatch(name) for name in names)


def test_an_unsatisfiable_schema_fails_cleanly_and_the_reasoner_goes_on(
    model_host: ModelHost,
) -> None:
    reasoner = model_host.roles["reasoner"].runtime
    image = picture(320, 240, (40, 120, 200))

    def run() -> tuple[list[JobFailure], str, str]:
        before = reasoner.reason(image, "What is here?", max_tokens=12)
        failures = []
        for schema in UNSATISFIABLE:
            try:
                reasoner.reason(image, "What is here?", max_tokens=12, schema=schema)
            except JobFailure as exc:
                failures.append(exc)
        return failures, before, reasoner.reason(image, "What is here?", max_tokens=12)

    failures, before, after = on_model_thread(model_host, run)
    assert len(failures) == len(UNSATISFIABLE)
    for failure in failures:
        assert failure.code == "schema_unsatisfiable" and failure.transient is False
        assert "Fix or simplify the schema" in failure.message
    assert "minimum (5) is greater than maximum (1)" in failures[0].message
    assert "incompatible types" in failures[1].message
    assert "look-around" in failures[2].message
    assert check_schema(UNSATISFIABLE[2]) == UNSATISFIABLE[2]  # refused only at decoding
    assert after == before  # nothing of the constrained attempt stays behind


def test_a_matcher_error_mid_answer_is_a_job_failure(model_host: ModelHost) -> None:
    import mlx.core as mx

    reasoner = model_host.roles["reasoner"].runtime
    processor = reasoner.constraints.processor(SURVEY)
    vocab = reasoner.constraints.llg_tokenizer.vocab_size
    logits = mx.zeros((1, vocab))
    masked = processor(mx.array([[2, 3]]), logits)  # the first step: only "{" may start it
    allowed = [t for t in range(vocab) if float(masked[0, t]) != float("-inf")]
    refused = reasoner.processor.tokenizer.convert_tokens_to_ids("a")
    assert allowed and refused not in allowed
    with pytest.raises(JobFailure) as caught:
        processor(mx.array([[2, 3, refused]]), logits)
    assert caught.value.code == "schema_unsatisfiable"


def test_two_images_go_in_the_first_message_in_order(model_host: ModelHost) -> None:
    from mlx_vlm import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    reasoner = model_host.roles["reasoner"].runtime
    first, second = picture(320, 240, (40, 120, 200)), picture(200, 310, (200, 60, 20))
    prompt = "The second image shows the numbered boxes. What is here?"
    image_token = reasoner.model.config.image_token_id

    def image_tokens(images: list[Image.Image]) -> int:
        chat = reasoner.messages(prompt, images=len(images))
        text = apply_chat_template(
            reasoner.processor, reasoner.model.config, chat, num_images=len(images)
        )
        ids = reasoner._inputs(images, text)["input_ids"]
        return int((ids == image_token).sum())

    def plain(images: list[Image.Image]) -> list[int]:
        text = apply_chat_template(
            reasoner.processor,
            reasoner.model.config,
            reasoner.messages(prompt, images=len(images)),
            num_images=len(images),
        )
        *_, last = stream_generate(
            reasoner.model,
            reasoner.processor,
            cast(str, text),
            image=cast(Any, images),
            max_tokens=12,
            temperature=0.0,
            skip_special_tokens=True,
        )
        return [int(t) for t in last.token_ids or []]

    def run() -> dict[str, Any]:
        reasoner.prefixes.clear()
        misses = reasoner.prefixes.misses
        both = reasoner.generate(
            [first, second], reasoner.messages(prompt, images=2), max_tokens=12
        )
        swapped = reasoner.generate(
            [second, first], reasoner.messages(prompt, images=2), max_tokens=12
        )
        alone = reasoner.generate(first, reasoner.messages(prompt), max_tokens=12)
        return {
            "one": image_tokens([first]),
            "other": image_tokens([second]),
            "two": image_tokens([first, second]),
            "both": both.token_ids,
            "plain": plain([first, second]),
            "swapped_plain": plain([second, first]),
            "swapped": swapped.token_ids,
            "alone": alone.token_ids,
            "plain_alone": plain([first]),
            "misses": reasoner.prefixes.misses - misses,
            "text": reasoner.reason([first, second], prompt, max_tokens=12),
        }

    seen = on_model_thread(model_host, run)
    # Each image's soft tokens (their number follows its aspect ratio), both in one prompt.
    assert seen["one"] > 0 and seen["other"] > 0
    assert seen["two"] == seen["one"] + seen["other"]
    assert seen["both"] == seen["plain"]  # exactly mlx-vlm's own two-image generation
    assert seen["swapped"] == seen["swapped_plain"]
    assert seen["alone"] == seen["plain_alone"]
    assert seen["misses"] == 3  # each image list is its own prefix: order counts
    assert isinstance(seen["text"], str)
