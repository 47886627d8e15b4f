"""Model host benchmark: load time, peak and resident memory against the weights' bytes, swap
time and unload recovery, on a random-weight detector and two reasoners `--scale` times wider
than the tiny test ones, against plain `mlx_vlm.load` of the same checkpoint measured in the
same run. Memory is MLX's own count (active bytes, peak since a reset), above the start of
each step.

    .venv/bin/python bench/model_host_bench.py [--scale 16] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_vlm

from service.models import budget, mlx_runtime, tiny
from service.models import quantize as quant
from service.models.host import ModelHost
from service.models.roles import Target

MiB = 1024 * 1024
ROWS: list[tuple[str, ...]] = []


def row(what: str, seconds: float, peak: int, resident: int, weights: int, note: str = "") -> None:
    ratio = f"{peak / resident:.2f}x" if resident > 0 else "-"
    ROWS.append(
        (what, f"{seconds:.2f}", f"{peak / MiB:.1f}", f"{resident / MiB:.1f}", ratio,
         f"{weights / MiB:.1f}", note)
    )  # fmt: skip


def start() -> int:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    return int(mx.get_active_memory())


def phases(state: Any) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in state.phases.items())


def weights(folder: Path) -> int:
    return sum(t.nbytes for t in budget.read_tensors(folder))


def baseline(path: Path) -> None:
    """The same checkpoint without the host: as stored, and with the CPU float32 rule applied
    after loading (what the runtimes did before staged loading)."""
    for cast in (False, True):
        before = start()
        began = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = mlx_vlm.load(str(path))
        if cast:
            mlx_runtime.use_fast_dtype(model)
        seconds = time.perf_counter() - began
        resident = int(mx.get_active_memory()) - before
        peak = int(mx.get_peak_memory()) - before
        name = "mlx_vlm.load + float32 cast" if cast else "mlx_vlm.load (dtype as stored)"
        row(f"baseline: {name}", seconds, peak, resident, weights(path))
        del model
    start()


async def timed_load(host: ModelHost, role: str, target: Target | None = None) -> tuple[Any, ...]:
    before = start()
    began = time.perf_counter()
    await host.load(role, target)
    seconds = time.perf_counter() - began
    return seconds, int(mx.get_peak_memory()) - before, int(mx.get_active_memory()) - before


def rss() -> str:
    """The process's resident set, where /proc tells it (Linux)."""
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return "?"
    pages = int(statm.read_text().split()[1])
    return f"{pages * os.sysconf('SC_PAGE_SIZE') / MiB:.0f}"


async def run_host(detector: Path, first: Path, second: Path, cache: Path) -> None:
    host = ModelHost({"detector": str(detector), "reasoner": str(first)}, cache_dir=cache)
    reasoner = host.roles["reasoner"]
    try:
        for role, path in (("detector", detector), ("reasoner", first)):
            seconds, peak, _ = await timed_load(host, role)
            state = host.roles[role]
            assert state.current is not None and state.estimate is not None
            row(f"host: load {role}", seconds, peak, state.current.resident_bytes, weights(path),
                f"estimated {state.estimate['resident_bytes'] / MiB:.1f} resident, "
                f"{state.estimate['peak_bytes'] / MiB:.1f} peak")  # fmt: skip
        for name, path in (("A->B", second), ("B->A", first)):
            seconds, peak, grown = await timed_load(host, "reasoner", Target(str(path)))
            assert reasoner.current is not None and reasoner.swap == "beside"
            row(f"host: swap reasoner {name}, beside", seconds, peak,
                reasoner.current.resident_bytes, weights(path),
                f"net {grown / MiB:+.1f} MiB; {phases(reasoner)}")  # fmt: skip
        loaded, rss_loaded = int(mx.get_active_memory()), rss()
        began = time.perf_counter()
        await host.unload("reasoner")
        seconds = time.perf_counter() - began
        freed = loaded - int(mx.get_active_memory())
        size = reasoner.last.resident_bytes if reasoner.last else 0
        note = f"MLX active -{freed / MiB:.1f} MiB; process RSS {rss_loaded} -> {rss()} MiB"
        row("host: unload reasoner", seconds, 0, size, weights(first), note)
        before = start()
        began = time.perf_counter()
        await host.thread.run(
            lambda: quant.convert(first, cache / "direct", source_revision="direct", bits=4)
        )
        row("mlx-vlm convert to 4 bits (alone)", time.perf_counter() - began,
            int(mx.get_peak_memory()) - before, 0, weights(first))  # fmt: skip
        for what in ("convert + load", "load cached copy"):
            if what == "load cached copy":
                await host.unload("reasoner")
            seconds, peak, _ = await timed_load(host, "reasoner", Target(str(first), 4))
            model = reasoner.current
            assert model is not None
            row(f"host: quantize 4 bits, {what}", seconds, model.peak_bytes, model.resident_bytes,
                weights(first), f"{phases(reasoner)} (peak: load phase)")  # fmt: skip
        detector_bytes = host.resident()["detector"]
    finally:
        await host.close()
    # A budget with room for the detector and one full-precision reasoner being loaded only.
    need = budget.estimate_load(budget.read_tensors(first), cpu=mlx_runtime.on_cpu())
    tight = ModelHost(
        {"detector": str(detector), "reasoner": str(first)},
        budget_bytes=detector_bytes + need.peak_bytes + MiB,
    )
    try:
        await tight.load_all()
        seconds, peak, grown = await timed_load(tight, "reasoner", Target(str(second)))
        state = tight.roles["reasoner"]
        assert state.current is not None and state.swap == "replace_first"
        row("host: swap reasoner A->B, freed first", seconds, peak, state.current.resident_bytes,
            weights(second), f"net {grown / MiB:+.1f} MiB; {phases(state)}")  # fmt: skip
    finally:
        await tight.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=16, help="width multiple of the tiny ones")
    parser.add_argument("--dir", type=Path, help="where to build the checkpoints (default: temp)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.dir or Path(tempfile.mkdtemp(prefix="aip-model-bench-"))
    began = time.perf_counter()
    detector = tiny.build_detector(root / f"falcon-x{args.scale}", scale=args.scale)
    first = tiny.build_reasoner(root / f"gemma-x{args.scale}-a", scale=args.scale)
    second = tiny.build_reasoner(root / f"gemma-x{args.scale}-b", scale=args.scale, seed=1)
    small = tiny.build_reasoner(root / "gemma-tiny")
    print(
        f"checkpoints (random weights, bfloat16 on disk) built in {time.perf_counter() - began:.1f}"
        f" s: detector {weights(detector) / MiB:.1f} MiB, reasoners "
        f"{weights(first) / MiB:.1f} MiB each ({weights(first) / weights(small):.0f}x the tiny "
        f"one); backend {'cpu' if mlx_runtime.on_cpu() else 'gpu'}, mlx {mx.__version__}, "
        f"mlx-vlm {mlx_vlm.__version__}\n"
    )
    cache = Path(tempfile.mkdtemp(prefix="aip-model-bench-q-"))
    try:
        baseline(first)
        asyncio.run(run_host(detector, first, second, cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    head = ("step", "seconds", "peak MiB", "resident MiB", "peak/resident", "weights MiB", "")
    widths = [max(len(r[i]) for r in [head, *ROWS]) for i in range(len(head))]
    for line in [head, tuple("-" * w for w in widths), *ROWS]:
        print("  ".join(cell.ljust(w) if i in (0, 6) else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(line, widths, strict=True))))  # fmt: skip
    print(
        "\npeak: MLX's peak above the step's start; resident: what the model's arrays hold "
        "(float32 on CPU); weights: tensor bytes in the files."
    )


if __name__ == "__main__":
    main()
