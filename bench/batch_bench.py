"""Batch benchmark (engine issue): burst throughput of 8 queued jobs run as batches of 1, 2, 4
and 8 through the pipeline's batched entry point (`analyse_many`: detection job by job, the
reasoning of a batch as one mlx-vlm batched generation), each against one job at a time,
interleaved in the same run, with the peak memory each batch size takes; and the batch size
`AIP_BATCH=auto` would choose from these numbers on this device.

    .venv/bin/python -m bench.batch_bench [--quick]

Quick runs on the tiny checkpoints, the full run on `small`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from PIL import Image

from bench.overhead_bench import CHECKPOINTS
from bench.table import Row, compare, interleaved, main_for, median

SIZES = (1, 2, 4, 8)
JOBS = 8
REASON_TOKENS = 32
DETECT_TOKENS = 32


def _image(n: int) -> Image.Image:
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (40 + 20 * n, 120, 200 - 20 * n)).save(buffer, format="JPEG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def run(quick: bool) -> list[Row]:
    import mlx.core as mx

    from service import batching
    from service.models import falcon, gemma, tiny
    from service.models.gemma_batch import reason_many
    from service.models.loading import on_cpu
    from service.params import JobParams
    from service.pipeline import BatchItem, analyse_many

    size, rounds = ("tiny", 2) if quick else ("small", 3)
    detector_path, reasoner_path = tiny.build_checkpoints(CHECKPOINTS / size, size)
    detector, reasoner = falcon.load(detector_path), gemma.load(reasoner_path)
    items = [
        BatchItem(_image(n), JobParams(("car",), f"What is in picture {n}?")) for n in range(JOBS)
    ]

    def burst(batch: int) -> Callable[[], float]:
        def measure() -> float:
            began = time.perf_counter()
            for start in range(0, JOBS, batch):
                analyse_many(
                    items[start : start + batch],
                    detector,
                    reasoner,
                    detect_tokens=DETECT_TOKENS,
                    reason_tokens=REASON_TOKENS,
                    reason_many=reason_many,
                )
            return JOBS / (time.perf_counter() - began)

        return measure

    candidates = {str(n): burst(n) for n in SIZES}
    peaks: dict[int, float] = {}
    for n, measure in zip(SIZES, candidates.values(), strict=True):
        mx.reset_peak_memory()
        measure()  # warm-up, and the peak memory this batch size takes
        peaks[n] = mx.get_peak_memory() / 2**20
    samples = interleaved(candidates, rounds)
    rates = {n: median(samples[str(n)]) for n in SIZES}
    device = "CPU" if on_cpu() else "GPU"
    rows = [
        compare(
            f"burst of {JOBS} jobs, batch {n} vs batch 1 ({size}, {device})",
            rates[n],
            rates[1],
            unit="jobs/s",
            note=f"{rounds} rounds interleaved; peak memory {peaks[n]:.0f} MiB at batch {n} vs "
            f"{peaks[1]:.0f} MiB at 1; {REASON_TOKENS} reasoning tokens a job; no target in "
            "the issue: the auto size is chosen from these rows",
        )
        for n in SIZES[1:]
    ]
    chosen = batching.best_measured(rates)
    rows.append(
        Row(
            f"AIP_BATCH=auto from these rows ({size}, {device})",
            float(chosen),
            float(batching.resolve("auto", on_cpu=device == "CPU")),
            None,
            "",
            None,
            "jobs",
            note=f"ours: the measured best (a size must give ≥ {batching.MIN_GAIN:g}× the "
            "throughput of the next smaller one); baseline: what auto uses without "
            "measuring on this device",
        )
    )
    return rows


if __name__ == "__main__":
    main_for("batch", run, __doc__)
