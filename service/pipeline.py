"""Detection, then reasoning over the image and what was detected: pure orchestration over two
small model protocols; knows neither mlx nor the database."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from service.detection import Detection
from service.grounding import crops_for, grounded_prompt, marks_image, parse_citations
from service.params import JobParams
from service.structured import PLAN_PROMPT, PLAN_SCHEMA, parse_answer, parse_plan
from service.tiled import detect_tiled
from service.tiles import NATIVE_SIDE_FALLBACK, grid, spec_for


class Detector(Protocol):
    def detect(self, image: Image.Image, query: str, *, max_new_tokens: int) -> list[Detection]: ...


class Reasoner(Protocol):
    """`image` may be a list of images (the image, then a marks image and crops); a reasoner
    that answers structured jobs and plans queries also takes `schema=` (a JSON Schema)."""

    def reason(self, image: Any, prompt: str, *, max_tokens: int) -> str: ...


# Tokens for the list of object names a planning call proposes.
PLAN_TOKENS = 64


def to_original(detections: Sequence[Detection], size: tuple[int, int]) -> list[Detection]:
    """Boxes found on a reduced image, in pixels of the original (masks keep their own size)."""
    out = []
    for d in detections:
        if d.image_size == size:
            out.append(d)
            continue
        sx, sy = size[0] / d.image_size[0], size[1] / d.image_size[1]
        x1, y1, x2, y2 = d.box
        box = (x1 * sx, y1 * sy, min(x2 * sx, size[0]), min(y2 * sy, size[1]))
        out.append(Detection(d.label, box, size, d.mask))
    return out


@dataclass(frozen=True)
class Analysis:
    detections: list[Detection]
    reasoning: str
    timings: dict[str, float]
    answer: Any = None  # the structured answer, when the job gave a response_schema
    citations: list[int] = field(default_factory=list)  # detection numbers the text cites
    planned_queries: list[str] | None = None  # what the reasoner proposed to look for
    tiling: dict[str, Any] | None = None  # the tile grid and its timings, when tiled


@dataclass(frozen=True)
class _Grounded:
    """A job after detection: what the reasoner is to be given."""

    detections: list[Detection]
    images: list[Image.Image]  # the image, then the marks image and crops, when asked
    prompt: str
    timings: dict[str, float]
    planned: list[str] | None
    tiling: dict[str, Any] | None


def _plan(image: Image.Image, reasoner: Reasoner, checkpoint: Callable[[str], None]) -> list[str]:
    """Ask the reasoner what to look for: a short list of object names, constrained."""
    checkpoint("plan")
    text = _reason(reasoner, [image], PLAN_PROMPT, PLAN_TOKENS, PLAN_SCHEMA)
    return parse_plan(text)


def _detect(
    image: Image.Image,
    queries: Sequence[str],
    detector: Detector,
    tokens: int,
    checkpoint: Callable[[str], None],
) -> list[list[Detection]]:
    detect_many = getattr(detector, "detect_many", None)  # one image encoding for all queries
    if detect_many is not None:
        return list(
            detect_many(
                image,
                queries,
                max_new_tokens=tokens,
                on_group=lambda group: checkpoint("detect:" + ", ".join(group)),
            )
        )
    groups = []
    for query in queries:
        checkpoint(f"detect:{query}")
        groups.append(detector.detect(image, query, max_new_tokens=tokens))
    return groups


def _ground(
    image: Image.Image,
    params: JobParams,
    detector: Detector,
    reasoner: Reasoner,
    *,
    detect_tokens: int,
    checkpoint: Callable[[str], None],
    original_size: tuple[int, int] | None,
    frame: Callable[[], Image.Image] | None,
    scale_time: Callable[[int], None],
) -> _Grounded:
    """Plan (when no queries were given), detect (tiled when the frame is larger than the
    detector's input), then put together what the reasoner sees."""
    timings: dict[str, float] = {}
    size = original_size or image.size
    planned = None
    queries = params.detection_queries
    if params.plan:
        began = time.perf_counter()
        planned = _plan(image, reasoner, checkpoint)
        queries = tuple(dict.fromkeys([*planned, *params.redact]))
        timings["plan"] = (time.perf_counter() - began) * 1000
    began = time.perf_counter()
    native = int(getattr(detector, "native_side", NATIVE_SIDE_FALLBACK))
    spec = spec_for(size, params.tiling, native) if queries else None
    full: Image.Image | None = None
    tiling = None
    if spec is not None:
        full = image if image.size == size or frame is None else frame()
        cells = len(grid(full.size, spec.size, spec.overlap)) + int(spec.full_frame)
        scale_time(cells)  # a tiled job does the detection work of `cells` images
        tiled = detect_tiled(
            full,
            queries,
            detector,
            spec,
            max_new_tokens=detect_tokens,
            checkpoint=checkpoint,
            working=image,
        )
        groups, tiling = tiled.groups, tiled.report
    else:
        found = _detect(image, queries, detector, detect_tokens, checkpoint) if queries else []
        groups = [to_original(g, size) if original_size else g for g in found]
    detections = [d for group in groups for d in group]
    timings["detect"] = (time.perf_counter() - began) * 1000
    images = [image]
    marks = params.set_of_marks and bool(detections)  # no boxes: no second image to describe
    if marks:
        images.append(marks_image(image, detections))
    crops = crops_for(full, detections) if full is not None and detections else []
    images += [crop.image for crop in crops]
    prompt = grounded_prompt(
        params.prompt,
        detections,
        size,
        marks=marks,
        crops=crops,
        schema=params.response_schema,
    )
    return _Grounded(detections, images, prompt, timings, planned, tiling)


def _reason(
    reasoner: Reasoner,
    images: Sequence[Image.Image],
    prompt: str,
    tokens: int,
    schema: dict[str, Any] | None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """One image goes as itself, several as a list; a schema only when there is one, and
    `on_text` only to a reasoner that `streams` (so one that takes neither still serves the
    plain case)."""
    shown: Any = images[0] if len(images) == 1 else list(images)
    extra: dict[str, Any] = {} if schema is None else {"schema": schema}
    if on_text is not None and getattr(reasoner, "streams", False):
        extra["on_text"] = on_text
    return reasoner.reason(shown, prompt, max_tokens=tokens, **extra)


def _finish(grounded: _Grounded, text: str, params: JobParams, reason_ms: float) -> Analysis:
    """The answer parsed (a structured job's text must be JSON valid against its schema, or
    the job fails with why) and its citations read."""
    schema = params.response_schema
    answer = parse_answer(text, schema) if schema is not None else None
    # A structured answer cites in its text fields; its numbers elsewhere are counts.
    cited = text if schema is None else " ".join(_strings(answer))
    return Analysis(
        detections=grounded.detections,
        reasoning=text,
        timings={**grounded.timings, "reason": reason_ms},
        answer=answer,
        citations=parse_citations(cited, len(grounded.detections)),
        planned_queries=grounded.planned,
        tiling=grounded.tiling,
    )


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON value, keys excepted, in document order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def analyse(
    image: Image.Image,
    params: JobParams,
    detector: Detector,
    reasoner: Reasoner,
    *,
    detect_tokens: int = 256,
    reason_tokens: int = 256,
    checkpoint: Callable[[str], None] = lambda stage: None,
    original_size: tuple[int, int] | None = None,
    frame: Callable[[], Image.Image] | None = None,
    scale_time: Callable[[int], None] = lambda cells: None,
    on_text: Callable[[str], None] | None = None,
) -> Analysis:
    """Plan queries if none were given, run them through the detector, then the reasoner once.

    The job's own token limits are used; `detect_tokens` and `reason_tokens` only for a job
    stored without them. `checkpoint(stage)` is called at each stage boundary and may raise
    to stop the job there (cancellation, timeout, shutdown). `original_size`: the size of the
    image `image` was reduced from; boxes are given in its pixels. `frame()` gives the image
    at that size, for tiled detection; `scale_time(n)` is told when detection will cost n
    images' worth (a tiled frame). `on_text` hears the reasoning as it is generated."""
    grounded = _ground(
        image,
        params,
        detector,
        reasoner,
        detect_tokens=params.detect_max_tokens or detect_tokens,
        checkpoint=checkpoint,
        original_size=original_size,
        frame=frame,
        scale_time=scale_time,
    )
    checkpoint("reason")
    began = time.perf_counter()
    text = _reason(
        reasoner,
        grounded.images,
        grounded.prompt,
        params.reason_max_tokens or reason_tokens,
        params.response_schema,
        on_text,
    )
    return _finish(grounded, text, params, (time.perf_counter() - began) * 1000)


@dataclass(frozen=True)
class BatchItem:
    """One job of a batch: its image, parameters, and its own stage checkpoint."""

    image: Image.Image
    params: JobParams
    checkpoint: Callable[[str], None] = lambda stage: None
    original_size: tuple[int, int] | None = None
    frame: Callable[[], Image.Image] | None = None
    scale_time: Callable[[int], None] = lambda cells: None


# Every job's reasoning in one call: (reasoner, images, prompts, token limits) -> texts.
ReasonMany = Callable[[Any, list[Image.Image], list[str], list[int]], list[str]]


def _reason_each(
    reasoner: Any, images: list[Image.Image], prompts: list[str], limits: list[int]
) -> list[str]:
    return [
        reasoner.reason(i, p, max_tokens=n) for i, p, n in zip(images, prompts, limits, strict=True)
    ]


def analyse_many(
    items: Sequence[BatchItem],
    detector: Detector,
    reasoner: Reasoner,
    *,
    detect_tokens: int = 256,
    reason_tokens: int = 256,
    reason_many: ReasonMany = _reason_each,
) -> list[Analysis | BaseException]:
    """`analyse` for several jobs, each job's outcome (or what stopped it) in its place: the
    same detections and text each would get alone. Detection runs job by job; the reasoning
    of the plain jobs still going (one image, no schema) runs as one `reason_many` call, the
    others' alone. A job that raises (its checkpoint included) ends alone; if the batched
    reasoning raises, each job's reasoning runs again alone, so only the job that causes it
    fails."""
    grounded: list[_Grounded | BaseException] = []
    for item in items:
        try:
            ready = _ground(
                item.image,
                item.params,
                detector,
                reasoner,
                detect_tokens=item.params.detect_max_tokens or detect_tokens,
                checkpoint=item.checkpoint,
                original_size=item.original_size,
                frame=item.frame,
                scale_time=item.scale_time,
            )
            item.checkpoint("reason")
        except Exception as exc:
            grounded.append(exc)
        else:
            grounded.append(ready)
    texts: dict[int, str | BaseException] = {}
    limits = [item.params.reason_max_tokens or reason_tokens for item in items]
    plain = [
        i
        for i, g in enumerate(grounded)
        if isinstance(g, _Grounded)
        and len(g.images) == 1
        and items[i].params.response_schema is None
    ]
    began = time.perf_counter()
    if plain:
        try:
            together = reason_many(
                reasoner,
                [_ready(grounded[i]).images[0] for i in plain],
                [_ready(grounded[i]).prompt for i in plain],
                [limits[i] for i in plain],
            )
            texts.update(zip(plain, together, strict=True))
        except Exception:
            pass  # each runs again alone below: only the job that causes it fails
    batch_ms = (time.perf_counter() - began) * 1000
    results: list[Analysis | BaseException] = []
    for index, (item, g) in enumerate(zip(items, grounded, strict=True)):
        if isinstance(g, BaseException):
            results.append(g)
            continue
        began = time.perf_counter()
        try:
            text = texts.get(index)
            if text is None:
                text = _reason(
                    reasoner, g.images, g.prompt, limits[index], item.params.response_schema
                )
                took = (time.perf_counter() - began) * 1000
            else:
                took = batch_ms
            assert isinstance(text, str)
            results.append(_finish(g, text, item.params, took))
        except Exception as exc:
            results.append(exc)
    return results


def _ready(grounded: _Grounded | BaseException) -> _Grounded:
    assert isinstance(grounded, _Grounded)
    return grounded
