"""Tiled detection: a large frame's tiles (and optionally the whole frame) through any detector
of the pipeline's protocol, boxes brought back to frame pixels and seams merged; knows neither
mlx nor jobs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from service.detection import Detection
from service.tiles import TileSpec, grid, merge, to_frame


@dataclass(frozen=True)
class Tiled:
    groups: list[list[Detection]]  # per query, in frame pixels, seams merged
    # {"size", "overlap", "full_frame", "grid": [[x1, y1, x2, y2], ...], "tile_ms": [...],
    #  "full_frame_ms": float | None, "merge_ms": float}
    report: dict[str, Any]


def _detect(
    detector: Any, image: Image.Image, queries: Sequence[str], max_new_tokens: int
) -> list[list[Detection]]:
    """One call for all queries (the image encoded once) when the detector can, else one per
    query."""
    detect_many = getattr(detector, "detect_many", None)
    if detect_many is not None:
        return list(detect_many(image, list(queries), max_new_tokens=max_new_tokens))
    return [list(detector.detect(image, q, max_new_tokens=max_new_tokens)) for q in queries]


def _ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 1)


def detect_tiled(
    frame: Image.Image,
    queries: Sequence[str],
    detector: Any,
    spec: TileSpec,
    *,
    max_new_tokens: int,
    checkpoint: Callable[[str], None] = lambda stage: None,
    working: Image.Image | None = None,
) -> Tiled:
    """Every query on every tile of `frame` (full resolution, RGB), then, when
    `spec.full_frame`, once on `working` (the frame as the untiled path would see it; the frame
    itself when None) for objects larger than a tile; per query, all boxes in frame pixels
    and merged across seams. `checkpoint(stage)` is called before each tile ("detect:tile
    i/n") and before the full-frame pass, and may raise to stop there. A frame that is one
    tile needs no full-frame pass: the tile is the whole frame at full resolution."""
    tiles = grid(frame.size, spec.size, spec.overlap)
    found: list[list[Detection]] = [[] for _ in queries]
    tile_ms: list[float] = []
    for index, tile in enumerate(tiles, start=1):
        checkpoint(f"detect:tile {index}/{len(tiles)}")
        began = time.perf_counter()
        groups = _detect(detector, frame.crop(tile), queries, max_new_tokens)
        for kept, group in zip(found, groups, strict=True):
            kept.extend(to_frame(group, tile, frame.size))
        tile_ms.append(_ms(began))
    full_frame_ms: float | None = None
    whole_frame = (0, 0, *frame.size)
    if spec.full_frame and tiles != [whole_frame]:
        checkpoint("detect:full frame")
        began = time.perf_counter()
        whole = frame if working is None else working
        groups = _detect(detector, whole, queries, max_new_tokens)
        for kept, group in zip(found, groups, strict=True):
            # The whole frame as the tile scales boxes as pipeline.to_original does (which
            # cannot be imported: the pipeline imports this module), masks to frame size too.
            kept.extend(to_frame(group, whole_frame, frame.size))
        full_frame_ms = _ms(began)
    began = time.perf_counter()
    merged = [merge(group) for group in found]
    report = {
        "size": spec.size,
        "overlap": spec.overlap,
        "full_frame": spec.full_frame,
        "grid": [list(tile) for tile in tiles],
        "tile_ms": tile_ms,
        "full_frame_ms": full_frame_ms,
        "merge_ms": _ms(began),
    }
    return Tiled(merged, report)
