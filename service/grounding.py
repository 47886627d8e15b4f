"""Grounds the reasoner in the detections: the numbered prompt, the set-of-marks image, close-up
crops of regions too small in the whole frame, and the detection numbers an answer cites; pure
over PIL images and `Detection`s, knowing neither the models nor the store."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from service.annotate import annotate
from service.detection import Detection

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Crop:
    """A close-up for the reasoner: `box` is the region in frame pixels, `numbers` the
    detections lying wholly inside it."""

    image: Image.Image
    box: tuple[int, int, int, int]
    numbers: tuple[int, ...]


def _scaled(box: Sequence[float], source: tuple[int, int], target: tuple[int, int]) -> Box:
    if source == target:
        return (box[0], box[1], box[2], box[3])
    sx, sy = target[0] / source[0], target[1] / source[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _percent(fraction: float) -> str:
    """A share of the frame with two significant digits, never in exponent form."""
    percent = fraction * 100
    if percent <= 0:
        return "0"
    decimals = max(0, 1 - math.floor(math.log10(percent)))
    return f"{percent:.{decimals}f}"


def _describe(number: int, d: Detection, frame_size: tuple[int, int]) -> str:
    x1, y1, x2, y2 = _scaled(d.box, d.image_size, frame_size)
    share = (x2 - x1) * (y2 - y1) / (frame_size[0] * frame_size[1])
    corners = ", ".join(str(round(v)) for v in (x1, y1, x2, y2))
    return f"{number}. {d.label} at [{corners}], {_percent(share)}% of the frame"


def grounded_prompt(
    question: str,
    detections: Sequence[Detection],
    frame_size: tuple[int, int],
    *,
    marks: bool = False,
    crops: Sequence[Crop] = (),
    schema: dict[str, Any] | None = None,
) -> str:
    """The reasoner's prompt: the numbered detections (numbers match the stored ones, 1-based
    in the order given; boxes in frame pixels) and the user's question, asking for citations
    by number. The images it describes come in this order: the frame, then the marks image
    when `marks`, then each of `crops`."""
    width, height = frame_size
    lines: list[str] = []
    if marks or crops:
        lines.append(f"The first image is the whole {width}x{height} frame.")
        shown = 2
        if marks:
            lines.append(
                "The second image is the same frame with each detection's box drawn and "
                "tagged with its number."
            )
            shown = 3
        for index, crop in enumerate(crops, start=shown):
            numbers = ", ".join(str(n) for n in crop.numbers)
            corners = ", ".join(str(v) for v in crop.box)
            lines.append(
                f"Image {index} is a close-up of the frame region [{corners}] "
                f"showing detection{'s' if len(crop.numbers) != 1 else ''} {numbers}."
            )
    if detections:
        where = "the frame" if marks or crops else f"this {width}x{height} image"
        lines.append(
            f"An object detector found {len(detections)} objects in {where} "
            "(boxes are [x1, y1, x2, y2] in pixels; the percentage is the box's share of the "
            "frame's area):"
        )
        lines += [_describe(n, d, frame_size) for n, d in enumerate(detections, start=1)]
        lines.append(
            "Cite the detections your answer relies on by their numbers in square brackets, "
            "like [3] or [1, 4]."
        )
    else:
        lines.append("An object detector found no objects for the requested queries.")
    lines += ["", question]
    if schema is not None:
        lines += [
            "",
            "Answer with JSON only, matching this JSON Schema"
            + (" (cite detections as [n] inside its text fields)" if detections else "")
            + ":",
            json.dumps(schema, separators=(",", ":"), sort_keys=True),
        ]
    return "\n".join(lines)


def marks_image(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of `image` with each detection's box drawn and tagged with its number (boxes
    scaled from their own pixels to the image's). Masks are left out: a tint would hide the
    small objects the reasoner is asked about."""
    drawn = [
        {"number": n, "label": d.label, "box": _scaled(d.box, d.image_size, image.size)}
        for n, d in enumerate(detections, start=1)
    ]
    return annotate(image, drawn)


def _union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _long_side(box: Box) -> float:
    return max(box[2] - box[0], box[3] - box[1])


def _span(low: float, high: float, side: int, limit: int) -> tuple[int, int]:
    """A run of `side` pixels (at most `limit`) centred on low..high, shifted inside 0..limit."""
    side = min(side, limit)
    start = round((low + high) / 2 - side / 2)
    start = max(0, min(start, limit - side))
    return start, start + side


def _window(union: Box, seen_side: int, frame_size: tuple[int, int]) -> tuple[int, int, int, int]:
    # Context of half the group's extent on each side, and never less than half the reasoner's
    # view, so a crop magnifies by two at most: past that it adds blur, not detail.
    side = max(math.ceil(2 * _long_side(union)), seen_side // 2, 1)
    x1, x2 = _span(union[0], union[2], side, frame_size[0])
    y1, y2 = _span(union[1], union[3], side, frame_size[1])
    return (x1, y1, x2, y2)


def crops_for(
    frame: Image.Image,
    detections: Sequence[Detection],
    *,
    seen_side: int = 896,
    max_crops: int = 4,
    min_seen_px: int = 32,
) -> list[Crop]:
    """Close-ups of the regions holding detections whose longest side would be under
    `min_seen_px` once the whole frame is shrunk to `seen_side`. Small detections are grouped
    while their union stays within half of `seen_side` (so the crop keeps full detail); each
    group's crop is square where the frame allows, with context around the group, and its
    image is at most `seen_side` a side. At most `max_crops`, the groups with the most
    detections first (then by their first number)."""
    if max_crops <= 0 or not detections:
        return []
    size = frame.size
    scale = min(1.0, seen_side / max(size))
    boxes = [_scaled(d.box, d.image_size, size) for d in detections]
    groups: list[tuple[Box, list[int]]] = []
    for number, box in enumerate(boxes, start=1):
        if _long_side(box) * scale >= min_seen_px:
            continue
        groups.append((box, [number]))
    reach = seen_side / 2
    merged = True
    while merged:  # to a fixpoint: a grown group may now reach one it could not before
        merged = False
        for i, (union, members) in enumerate(groups):
            j = i + 1
            while j < len(groups):
                joined = _union(union, groups[j][0])
                if _long_side(joined) <= reach:
                    union, members = joined, members + groups[j][1]
                    del groups[j]
                    merged = True
                else:
                    j += 1
            groups[i] = (union, members)
    groups.sort(key=lambda g: (-len(g[1]), min(g[1])))
    crops = []
    for union, _members in groups[:max_crops]:
        window = _window(union, seen_side, size)
        image = frame.crop(window)
        if max(image.size) > seen_side:
            image.thumbnail((seen_side, seen_side), Image.Resampling.LANCZOS)
        inside = tuple(
            n
            for n, b in enumerate(boxes, start=1)
            if window[0] <= b[0] and window[1] <= b[1] and b[2] <= window[2] and b[3] <= window[3]
        )
        crops.append(Crop(image=image, box=window, numbers=inside))
    return crops


_NUMBER = r"\d+(?:\s*(?:-|–|—|to)\s*\d+)?"
_LIST = rf"{_NUMBER}(?:\s*(?:,|and|&|or)\s*{_NUMBER})*"
_BRACKETED = re.compile(rf"\[\s*({_LIST})\s*,?\s*\]")
_HASHED = re.compile(r"(?<![&\w])#\s?(\d+)(?!\.?\d)")
_NAMED = re.compile(
    rf"\b(?:detections?|objects?|boxes|box|items?|marks?|nos?\.|numbers?)\s*#?\s*({_LIST})"
    r"(?!\.?\d)",
    re.IGNORECASE,
)
_PIECE = re.compile(r"(\d+)(?:\s*(?:-|–|—|to)\s*(\d+))?")


def _expand(listed: str, count: int) -> list[int] | None:
    numbers: list[int] = []
    for first, last in _PIECE.findall(listed):
        low, high = sorted((int(first), int(last or first)))
        if low < 1 or high > count:
            return None
        numbers += range(low, high + 1)
    return numbers


def parse_citations(text: str, count: int) -> list[int]:
    """The detection numbers `text` cites: `[3]`, `[1, 4]`, `[2-4]`, `#5`, `detection 2`,
    `objects 1 and 3`; unique, in order of first appearance. A citation naming any number
    outside 1..`count` is not one (an echoed box like `[12, 40, 300, 200]`, a year) and is
    dropped whole."""
    found: list[tuple[int, list[int]]] = []
    for pattern in (_BRACKETED, _HASHED, _NAMED):
        for match in pattern.finditer(text):
            numbers = _expand(match.group(1), count)
            if numbers:
                found.append((match.start(), numbers))
    found.sort(key=lambda item: item[0])
    return list(dict.fromkeys(n for _, numbers in found for n in numbers))
