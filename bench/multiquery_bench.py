"""Multi-query benchmark (engine issue): detect time for 3 and 8 queries on one image against
one query, both through the service's detector (the image's prefix is prefilled once and the
queries decode together as rows of a batch), and our one-query detect against mlx-vlm's plain
`generate_perception` (which runs the vocabulary head over every prompt position), all
measured interleaved in the same run.

    .venv/bin/python -m bench.multiquery_bench [--quick]

Quick runs on the tiny detector, the full run on `small`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from PIL import Image

from bench.overhead_bench import CHECKPOINTS
from bench.table import Row, compare, interleaved, main_for, median

QUERIES = ["car", "person", "building", "tree", "road", "roof", "boat", "truck"]
TARGETS = {3: 1.5, 8: 2.5}  # at most this many times the one-query detect
TOKENS = 64


def run(quick: bool) -> list[Row]:
    from service.models import falcon, tiny

    size, rounds = ("tiny", 3) if quick else ("small", 3)
    detector_path, _ = tiny.build_checkpoints(CHECKPOINTS / size, size)
    detector = falcon.load(detector_path)
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (40, 120, 200)).save(buffer, format="JPEG")
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    def ours(n: int) -> Callable[[], float]:
        def measure() -> float:
            began = time.perf_counter()
            detector.detect_many(image, QUERIES[:n], max_new_tokens=TOKENS)
            return time.perf_counter() - began

        return measure

    def plain() -> float:
        began = time.perf_counter()
        detector.model.generate_perception(
            detector.processor, image=image, query=QUERIES[0], max_new_tokens=TOKENS
        )
        return time.perf_counter() - began

    candidates = {"1": ours(1), "3": ours(3), "8": ours(8), "plain": plain}
    for measure in candidates.values():
        measure()  # warm-up
    samples = interleaved(candidates, rounds)
    one = median(samples["1"])
    rows = [
        compare(
            f"detect, {n} queries on one 640×480 image vs 1 query ({size})",
            median(samples[str(n)]),
            one,
            unit="s",
            at_most=TARGETS[n],
            note=f"{rounds} rounds interleaved; image prefix prefilled once, queries decoded "
            f"as rows of one batch; {n} × one query would be {n * one:.2f} s",
        )
        for n in (3, 8)
    ]
    rows.append(
        compare(
            f"detect, 1 query: ours vs mlx-vlm generate_perception ({size})",
            one,
            median(samples["plain"]),
            unit="s",
            note=f"{rounds} rounds interleaved; ours computes vocabulary logits at the last "
            "prompt position only and skips the coord/size heads at steps that emit no box; "
            "no target in the issue",
        )
    )
    return rows


if __name__ == "__main__":
    main_for("multiquery", run, __doc__)
