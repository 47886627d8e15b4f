"""Tiling benchmark (aerial issue): a 20-megapixel frame (5472×3648) with 3 queries through the
service's tiled detection (auto tiles at the detector's native side, the full-frame pass on
the working image, seams merged) against the issue's yardstick, tiles × one query on one
native tile, measured in the same run through the same detector, the one-tile samples taken
between tiles of the tiled run (and their time taken out of it).

    .venv/bin/python -m bench.tiles_bench [--quick]

Both runs use the tiny detector: the image prefill dominates a tile there as in the real
model, and `small` would take over 6 minutes for one tiled frame on two cores. Quick runs
one 12-megapixel frame (to stay near a minute), the full run the 20-megapixel one twice.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
from PIL import Image

from bench.overhead_bench import CHECKPOINTS
from bench.table import Row, compare, main_for, median

FRAME = (5472, 3648)  # 20 megapixels, a common drone sensor
QUICK_FRAME = (4000, 3000)  # 12 megapixels: 20 tiles instead of 35
QUERIES = ["car", "person", "building"]
TARGET = 1.3  # at most this many times tiles × one query on one tile
TOKENS = 64
SAMPLE_EVERY = 5  # a baseline sample before tiles 1, 6, 11, ...


def frame_of(size: tuple[int, int]) -> Image.Image:
    """A synthetic aerial-like frame: smooth fields with small bright blocks scattered over."""
    width, height = size
    rng = np.random.default_rng(13)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 90 + 40 * np.sin(xs / 300) * np.cos(ys / 220)
    pixels = np.stack([base, base * 1.2, base * 0.8], axis=-1).clip(0, 255).astype(np.uint8)
    for x, y in zip(
        rng.integers(0, width - 40, 400), rng.integers(0, height - 20, 400), strict=True
    ):
        pixels[y : y + 20, x : x + 40] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def run(quick: bool) -> list[Row]:
    from service.decode import WORKING_SIDE
    from service.models import falcon, tiny
    from service.tiled import Tiled, detect_tiled
    from service.tiles import grid, spec_for

    size, rounds = (QUICK_FRAME, 1) if quick else (FRAME, 2)
    detector_path, _ = tiny.build_checkpoints(CHECKPOINTS / "tiny", "tiny")
    detector = falcon.load(detector_path)
    frame = frame_of(size)
    working = frame.reduce(math.ceil(max(size) / WORKING_SIDE))  # what the untiled path sees
    spec = spec_for(frame.size, "auto", detector.native_side)
    assert spec is not None
    tiles = grid(frame.size, spec.size, spec.overlap)
    spread = [frame.crop(tiles[i * (len(tiles) - 1) // 2]) for i in range(3)]
    one: list[float] = []  # seconds of one query on one native tile
    runs: list[tuple[float, Tiled]] = []

    def checkpoint(stage: str) -> None:
        """Between some tiles, a baseline sample: the two alternate through the run, so a
        busy machine slows both alike. Its time is taken out of the tiled run's."""
        if not stage.startswith("detect:tile "):
            return
        if int(stage.split()[1].split("/")[0]) % SAMPLE_EVERY != 1:
            return
        began = time.perf_counter()
        detector.detect_many(spread[len(one) % len(spread)], QUERIES[:1], max_new_tokens=TOKENS)
        one.append(time.perf_counter() - began)

    detector.detect_many(spread[0], QUERIES, max_new_tokens=TOKENS)  # warm-up
    detector.detect_many(working, QUERIES, max_new_tokens=TOKENS)
    for _ in range(rounds):
        sampled = len(one)
        began = time.perf_counter()
        tiled = detect_tiled(
            frame,
            QUERIES,
            detector,
            spec,
            max_new_tokens=TOKENS,
            checkpoint=checkpoint,
            working=working,
        )
        runs.append((time.perf_counter() - began - sum(one[sampled:]), tiled))
    per_one = median(one)
    report: dict[str, Any] = runs[-1][1].report
    per_tile = statistics.median(ms for _, r in runs for ms in r.report["tile_ms"]) / 1000
    found = sum(len(group) for group in runs[-1][1].groups)
    megapixels = size[0] * size[1] / 1e6
    return [
        compare(
            f"tiled detection, {size[0]}×{size[1]} frame ({megapixels:.0f} MP), "
            f"{len(QUERIES)} queries vs tiles × one query on one tile (tiny)",
            median(t for t, _ in runs),
            len(tiles) * per_one,
            unit="s",
            at_most=TARGET,
            note=f"{len(tiles)} tiles of {spec.size} px (overlap {spec.overlap}), "
            f"{per_tile:.2f} s per tile for {len(QUERIES)} queries, one query on one tile "
            f"{per_one:.2f} s ({len(one)} samples between tiles); full-frame pass on the "
            f"{working.width}×{working.height} working image "
            f"{report['full_frame_ms'] / 1000:.2f} s; merge {report['merge_ms']:.1f} ms "
            f"({found} boxes kept); {rounds} tiled run(s); each tile's prefix is prefilled "
            "once for all its queries",
        )
    ]


if __name__ == "__main__":
    main_for("tiles", run, __doc__)
