"""Tile geometry and seam merging for frames larger than the detector's input: pure functions
over sizes, boxes and Detections; knows neither models nor jobs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.detection import Detection, decode_mask, encode_mask
from service.errors import InvalidInput

# The side a detector that does not say its own is assumed to take unresized (Falcon
# Perception's: the largest multiple of its 16-pixel patch within its pixel budget).
NATIVE_SIDE_FALLBACK = 992
MIN_SIZE, MAX_SIZE = 128, 4096
AUTO_OVERLAP = 0.125  # of the tile side: auto tiles share this much with their neighbours

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class TileSpec:
    size: int  # tile side in frame pixels
    overlap: int  # the least overlap between neighbouring tiles
    full_frame: bool  # also one pass over the whole frame, for objects larger than a tile


def _refuse(why: str) -> InvalidInput:
    return InvalidInput(
        f'tiling {why}: give "auto", "off" or {{"size": {MIN_SIZE}..{MAX_SIZE}, '
        '"overlap": 0..size/2, "full_frame": true|false}',
        code="invalid_tiling",
    )


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise _refuse(f"{name} must be a whole number, got {value!r}")
    return int(value)


def parse_tiling(raw: Any) -> str | dict[str, Any]:
    """A job's tiling normalized: "auto", "off" or {"size", "overlap", "full_frame"}; JSON
    text (as a form field carries it) is read first. `overlap` defaults to an eighth of
    `size`, `full_frame` to true. Anything else raises InvalidInput(code="invalid_tiling")."""
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in ("auto", "off"):
            return text.lower()
        try:
            raw = json.loads(text)
        except ValueError:
            raise _refuse(f"{raw[:40]!r} is not understood") from None
        if isinstance(raw, str):
            if raw.strip().lower() in ("auto", "off"):
                return raw.strip().lower()
            raise _refuse(f"{raw[:40]!r} is not understood")
    if not isinstance(raw, dict):
        raise _refuse(f"{type(raw).__name__} is not understood")
    unknown = sorted(set(raw) - {"size", "overlap", "full_frame"})
    if unknown:
        raise _refuse(f"has unknown keys {', '.join(map(str, unknown))}")
    if "size" not in raw:
        raise _refuse("needs a size")
    size = _whole(raw["size"], "size")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise _refuse(f"size {size} is out of range")
    overlap = _whole(raw.get("overlap", round(size * AUTO_OVERLAP)), "overlap")
    if not 0 <= overlap <= size // 2:
        raise _refuse(f"overlap {overlap} is out of range for size {size}")
    full_frame = raw.get("full_frame", True)
    if not isinstance(full_frame, bool):
        raise _refuse(f"full_frame must be true or false, got {full_frame!r}")
    return {"size": size, "overlap": overlap, "full_frame": full_frame}


def spec_for(
    frame_size: tuple[int, int], tiling: str | dict[str, Any], native_side: int
) -> TileSpec | None:
    """The tiles a frame is cut into, or None to detect on the whole frame: "off", or "auto"
    with the frame's longest side within the detector's `native_side`. Auto tiles are the
    native side, overlapping by an eighth, plus a full-frame pass."""
    chosen = parse_tiling(tiling)
    if chosen == "off":
        return None
    if chosen == "auto":
        if max(frame_size) <= native_side:
            return None
        return TileSpec(native_side, round(native_side * AUTO_OVERLAP), True)
    assert isinstance(chosen, dict)
    return TileSpec(chosen["size"], chosen["overlap"], chosen["full_frame"])


def _starts(length: int, size: int, overlap: int) -> list[int]:
    """Evenly spaced starts of `size`-long spans covering 0..length, neighbours sharing at
    least `overlap`; one span (the whole length) when it fits."""
    if length <= size:
        return [0]
    count = math.ceil((length - size) / (size - overlap)) + 1
    return [round(k * (length - size) / (count - 1)) for k in range(count)]


def grid(frame_size: tuple[int, int], size: int, overlap: int) -> list[Box]:
    """Tiles (x1, y1, x2, y2), row by row: together they cover every pixel, each lies inside
    the frame and is size x size (narrower only along a side shorter than `size`), spaced
    evenly so neighbours share at least `overlap` pixels."""
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"tile size {size} with overlap {overlap}")
    width, height = frame_size
    tile_w, tile_h = min(size, width), min(size, height)
    return [
        (x, y, x + tile_w, y + tile_h)
        for y in _starts(height, size, overlap)
        for x in _starts(width, size, overlap)
    ]


def _mask_in_frame(mask: dict[str, Any], tile: Box, frame_size: tuple[int, int]) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    x1, y1, x2, y2 = tile
    local = decode_mask(mask)
    if local.shape != (y2 - y1, x2 - x1):
        scaled = Image.fromarray(local).resize((x2 - x1, y2 - y1), Image.Resampling.NEAREST)
        local = np.asarray(scaled, dtype=bool)
    whole = np.zeros((frame_size[1], frame_size[0]), dtype=bool)
    whole[y1:y2, x1:x2] = local
    return encode_mask(whole)


def to_frame(found: Sequence[Detection], tile: Box, frame_size: tuple[int, int]) -> list[Detection]:
    """Detections made on the crop `tile` of a frame, in the frame's pixels: boxes scaled from
    the size the detector reported them at to the tile's, shifted by its corner and clipped
    to the frame; masks placed into a frame-sized mask."""
    x1, y1, x2, y2 = tile
    width, height = frame_size
    out = []
    for d in found:
        sx, sy = (x2 - x1) / d.image_size[0], (y2 - y1) / d.image_size[1]
        bx1, by1, bx2, by2 = d.box
        box = (
            min(max(x1 + bx1 * sx, 0.0), width),
            min(max(y1 + by1 * sy, 0.0), height),
            min(max(x1 + bx2 * sx, 0.0), width),
            min(max(y1 + by2 * sy, 0.0), height),
        )
        mask = _mask_in_frame(d.mask, tile, frame_size) if d.mask is not None else None
        out.append(Detection(d.label, box, frame_size, mask))
    return out


def _area(box: tuple[float, float, float, float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def overlap_of_smaller(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float]
) -> float:
    """Intersection area over the smaller box's area. A box of no area (a line or a point)
    counts as 1 when it touches the other, else 0."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix < 0 or iy < 0:
        return 0.0
    smaller = min(_area(a), _area(b))
    if smaller <= 0:
        return 1.0
    return ix * iy / smaller


def _union(members: list[Detection]) -> Detection:
    first = members[0]
    if len(members) == 1:
        return first
    box = (
        min(d.box[0] for d in members),
        min(d.box[1] for d in members),
        max(d.box[2] for d in members),
        max(d.box[3] for d in members),
    )
    masks = [d.mask for d in members if d.mask is not None]
    return Detection(first.label, box, first.image_size, _or_masks(masks, first.image_size))


def _or_masks(masks: list[dict[str, Any]], image_size: tuple[int, int]) -> dict[str, Any] | None:
    if not masks:
        return None
    import numpy as np
    from PIL import Image

    width, height = image_size
    whole = np.zeros((height, width), dtype=bool)
    for mask in masks:
        array = decode_mask(mask)
        if array.shape != (height, width):
            scaled = Image.fromarray(array).resize((width, height), Image.Resampling.NEAREST)
            array = np.asarray(scaled, dtype=bool)
        whole |= array
    return encode_mask(whole)


def _components(items: list[Detection], threshold: float) -> list[list[Detection]]:
    """Groups of detections linked, directly or through others, by an overlap at threshold."""
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if overlap_of_smaller(items[i].box, items[j].box) >= threshold:
                parent[root(i)] = root(j)
    groups: dict[int, list[Detection]] = {}
    for i, item in enumerate(items):
        groups.setdefault(root(i), []).append(item)
    return list(groups.values())


def _order(d: Detection) -> tuple[str, tuple[float, ...], tuple[int, int]]:
    return (d.label, d.box, d.image_size)


def merge(detections: Sequence[Detection], threshold: float = 0.5) -> list[Detection]:
    """Seam duplicates made one. The rule: two detections with the same label (and image
    size) whose boxes' intersection covers at least `threshold` of the smaller box's area
    are the same object; every group linked so, directly or through others, becomes one
    detection whose box is the union of the group's boxes and whose mask is the OR of their
    masks (those that have one). Union boxes may link further groups, so this repeats until
    nothing links: the fixpoint. Linking is decided on the whole set at once, so the result
    does not depend on the input's order, and merging it again changes nothing. Sorted by
    label, then box. Intersection over the smaller area (not over the union) is what joins a
    box cut at a tile edge to the whole box a neighbouring tile saw."""
    if not 0 < threshold <= 1:
        raise ValueError(f"merge threshold must be in (0, 1], got {threshold}")
    by_kind: dict[tuple[str, tuple[int, int]], list[Detection]] = {}
    for d in detections:
        by_kind.setdefault((d.label, d.image_size), []).append(d)
    out: list[Detection] = []
    for items in by_kind.values():
        while True:
            groups = _components(items, threshold)
            merged = [_union(sorted(group, key=_order)) for group in groups]
            if len(merged) == len(items):
                break
            items = merged
        out.extend(items)
    return sorted(out, key=_order)
