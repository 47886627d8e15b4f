"""Detection, then reasoning over the image and what was detected: pure orchestration over two
small model protocols; knows neither mlx nor the database."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from service.config import Settings
from service.detection import Detection
from service.errors import InvalidInput


class Detector(Protocol):
    def detect(self, image: Image.Image, query: str, *, max_new_tokens: int) -> list[Detection]: ...


class Reasoner(Protocol):
    def reason(self, image: Image.Image, prompt: str, *, max_tokens: int) -> str: ...


@dataclass(frozen=True)
class JobParams:
    queries: tuple[str, ...]
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    # Stored resolved, so a retry generates as much as the first attempt did; None only for
    # jobs stored before limits were (they run with the settings' values).
    detect_max_tokens: int | None = None
    reason_max_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"queries": list(self.queries), "prompt": self.prompt, "options": self.options}
        for name in TOKEN_LIMITS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobParams:
        return cls(
            tuple(raw["queries"]),
            raw["prompt"],
            dict(raw.get("options") or {}),
            raw.get("detect_max_tokens"),
            raw.get("reason_max_tokens"),
        )


# A job's generation limits: each defaults to, and may not exceed, its setting.
TOKEN_LIMITS = {
    "detect_max_tokens": "AIP_DETECT_MAX_TOKENS",
    "reason_max_tokens": "AIP_REASON_MAX_TOKENS",
}


def token_limit(raw: Any, name: str, cap: int) -> int:
    """A job's `name` (form text or a JSON number; absent: `cap`) checked to be 1..`cap`."""
    if raw is None or raw == "":
        return cap
    refusal = InvalidInput(
        f"{name} must be a whole number from 1 to {cap}: {TOKEN_LIMITS[name]} is this "
        "service's default and ceiling",
        code="invalid_option",
    )
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise refusal
    try:
        value = int(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError, OverflowError):
        raise refusal from None
    if not 1 <= value <= cap:
        raise refusal
    return value


def parse_queries(values: Iterable[str]) -> list[str]:
    """Repeatable values, each possibly comma-separated: ["car, truck", "person"] -> 3."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def build_params(
    queries: Sequence[str] | None,
    prompt: str | None,
    *,
    default_queries: Sequence[str],
    default_prompt: str,
    max_queries: int,
    max_prompt_chars: int,
    max_query_chars: int = 200,
    detect_max_tokens: int | None = None,
    reason_max_tokens: int | None = None,
) -> JobParams:
    chosen = parse_queries(queries) if queries else list(default_queries)
    unique = list(dict.fromkeys(chosen))
    if not unique:
        raise InvalidInput("at least one detection query is needed", code="invalid_queries")
    if len(unique) > max_queries:
        raise InvalidInput(
            f"{len(unique)} detection queries; at most {max_queries} per job",
            code="invalid_queries",
        )
    for query in unique:
        if len(query) > max_query_chars:
            raise InvalidInput(
                f"detection query of {len(query)} characters; at most {max_query_chars}",
                code="invalid_queries",
            )
    text = default_prompt if prompt is None or not prompt.strip() else prompt.strip()
    if len(text) > max_prompt_chars:
        raise InvalidInput(
            f"prompt of {len(text)} characters; at most {max_prompt_chars}", code="invalid_prompt"
        )
    return JobParams(
        tuple(unique),
        text,
        detect_max_tokens=detect_max_tokens,
        reason_max_tokens=reason_max_tokens,
    )


def params_within(
    queries: Sequence[str] | None,
    prompt: str | None,
    settings: Settings,
    *,
    detect_max_tokens: Any = None,
    reason_max_tokens: Any = None,
) -> JobParams:
    """`build_params` with the service's defaults and limits; the token limits as sent (text
    or a number; None: the setting)."""
    return build_params(
        queries,
        prompt,
        default_queries=settings.default_queries,
        default_prompt=settings.default_prompt,
        max_queries=settings.max_queries,
        max_prompt_chars=settings.max_prompt_chars,
        detect_max_tokens=token_limit(
            detect_max_tokens, "detect_max_tokens", settings.detect_max_tokens
        ),
        reason_max_tokens=token_limit(
            reason_max_tokens, "reason_max_tokens", settings.reason_max_tokens
        ),
    )


def reasoning_prompt(question: str, detections: Sequence[Detection]) -> str:
    """The reasoner sees the numbered detections (numbers match the stored ones) and the
    user's question."""
    if detections:
        width, height = detections[0].image_size
        lines = [
            f"An object detector found {len(detections)} objects in this "
            f"{width}x{height} image (boxes are [x1, y1, x2, y2] in pixels):"
        ]
        lines += [
            f"{n}. {d.label} at [{', '.join(str(round(v)) for v in d.box)}]"
            for n, d in enumerate(detections, start=1)
        ]
    else:
        lines = ["An object detector found no objects for the requested queries."]
    return "\n".join([*lines, "", question])


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
) -> Analysis:
    """Run every query through the detector, then the reasoner once.

    The job's own token limits are used; `detect_tokens` and `reason_tokens` only for a job
    stored without them. `checkpoint(stage)` is called at each stage boundary and may raise
    to stop the job there (cancellation, timeout, shutdown). `original_size`: the size of the
    image `image` was reduced from; boxes are given in its pixels."""
    detect_tokens = params.detect_max_tokens or detect_tokens
    reason_tokens = params.reason_max_tokens or reason_tokens
    detections: list[Detection] = []
    began = time.perf_counter()
    detect_many = getattr(detector, "detect_many", None)  # one image encoding for all queries
    if detect_many is not None:
        groups = detect_many(
            image,
            params.queries,
            max_new_tokens=detect_tokens,
            on_group=lambda group: checkpoint("detect:" + ", ".join(group)),
        )
    else:
        groups = []
        for query in params.queries:
            checkpoint(f"detect:{query}")
            groups.append(detector.detect(image, query, max_new_tokens=detect_tokens))
    for found in groups:
        detections.extend(to_original(found, original_size) if original_size else found)
    detected = time.perf_counter()
    checkpoint("reason")
    reasoning = reasoner.reason(
        image, reasoning_prompt(params.prompt, detections), max_tokens=reason_tokens
    )
    reasoned = time.perf_counter()
    return Analysis(
        detections=detections,
        reasoning=reasoning,
        timings={"detect": (detected - began) * 1000, "reason": (reasoned - detected) * 1000},
    )


@dataclass(frozen=True)
class BatchItem:
    """One job of a batch: its image, parameters, and its own stage checkpoint."""

    image: Image.Image
    params: JobParams
    checkpoint: Callable[[str], None] = lambda stage: None
    original_size: tuple[int, int] | None = None


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
    of the jobs still going runs as one `reason_many` call. A job that raises (its
    checkpoint included) ends alone; if the batched reasoning raises, each job's reasoning
    runs again alone, so only the job that causes it fails."""
    results: list[Analysis | BaseException] = []
    for item in items:
        try:
            results.append(
                analyse(
                    item.image,
                    item.params,
                    detector,
                    _Deferred(),
                    detect_tokens=detect_tokens,
                    checkpoint=item.checkpoint,
                    original_size=item.original_size,
                )
            )
        except Exception as exc:
            results.append(exc)
    going: list[int] = []
    for index, item in enumerate(items):
        if isinstance(results[index], Analysis):
            try:
                item.checkpoint("reason")
            except Exception as exc:
                results[index] = exc
            else:
                going.append(index)
    began = time.perf_counter()
    prompts = [reasoning_prompt(items[i].params.prompt, _found(results[i])) for i in going]
    images = [items[i].image for i in going]
    limits = [items[i].params.reason_max_tokens or reason_tokens for i in going]
    texts: list[str | BaseException]
    try:
        texts = list(reason_many(reasoner, images, prompts, limits)) if going else []
    except Exception:
        texts = []
        for image, prompt, limit in zip(images, prompts, limits, strict=True):
            try:
                texts.append(reasoner.reason(image, prompt, max_tokens=limit))
            except Exception as exc:
                texts.append(exc)
    reason_ms = (time.perf_counter() - began) * 1000
    for index, text in zip(going, texts, strict=True):
        done = results[index]
        assert isinstance(done, Analysis)
        results[index] = (
            text
            if isinstance(text, BaseException)
            else Analysis(done.detections, text, {**done.timings, "reason": reason_ms})
        )
    return results


class _Deferred:
    """The reasoner of a batch's detection pass: reasoning waits for the whole batch."""

    def reason(self, image: Image.Image, prompt: str, *, max_tokens: int) -> str:
        return ""


def _found(result: Analysis | BaseException) -> list[Detection]:
    assert isinstance(result, Analysis)
    return result.detections
