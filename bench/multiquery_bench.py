"""Multi-query benchmark (issue row 4): detect time for 1, 3 and 8 queries on one image through
the service's detector runtime, against N times the one-query time measured in the same run
(below 1: the queries share work, such as the image encoding).

    .venv/bin/python -m bench.multiquery_bench [--quick]

Quick runs on the tiny detector, the full run on `small`; targets come with the engine issue.
"""

from __future__ import annotations

import io
import time
from functools import partial

from PIL import Image

from bench.overhead_bench import CHECKPOINTS
from bench.table import Row, compare, interleaved, main_for, median

QUERIES = ["car", "person", "building", "tree", "road", "roof", "boat", "truck"]


def run(quick: bool) -> list[Row]:
    from service.models import falcon, tiny

    size, rounds = ("tiny", 3) if quick else ("small", 2)
    detector_path, _ = tiny.build_checkpoints(CHECKPOINTS / size, size)
    detector = falcon.load(detector_path)
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (40, 120, 200)).save(buffer, format="JPEG")
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    def detect(n: int) -> float:
        began = time.perf_counter()
        for query in QUERIES[:n]:
            detector.detect(image, query)
        return time.perf_counter() - began

    detect(1)  # warm-up
    samples = interleaved({str(n): partial(detect, n) for n in (1, 3, 8)}, rounds)
    one = median(samples["1"])
    return [
        compare(
            f"detect, {n} queries on one 640×480 image vs {n} × one query ({size})",
            median(samples[str(n)]),
            n * one,
            unit="s",
            note=f"{rounds} rounds interleaved; one query {one:.2f} s; the service runs one "
            "generate_perception per query today; target set by the engine issue",
        )
        for n in (3, 8)
    ]


if __name__ == "__main__":
    main_for("multiquery", run, __doc__)
