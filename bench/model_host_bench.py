"""Model host benchmark: load time, peak and resident memory against the weights' bytes, swap
time and unload recovery, on a random-weight detector and two reasoners `--scale` times wider
than the tiny test ones, against plain `mlx_vlm.load` of the same checkpoint measured in the
same run. Memory is MLX's own count (active bytes, peak since a reset), above the start of
each step.

    .venv/bin/python -m bench.model_host_bench [--quick]
"""

from __future__ import annotations

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

from bench.table import Row, compare, main_for
from service.models import budget, mlx_runtime, tiny
from service.models import quantize as quant
from service.models.host import ModelHost
from service.models.roles import Target

MiB = 1024 * 1024
STEPS: dict[str, dict[str, Any]] = {}  # step -> seconds, peak, resident, weights, note


def row(what: str, seconds: float, peak: int, resident: int, weights: int, note: str = "") -> None:
    STEPS[what] = {
        "seconds": seconds, "peak": peak, "resident": resident, "weights": weights, "note": note
    }  # fmt: skip


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


def rss() -> int | None:
    """The process's resident bytes, where /proc tells it (Linux)."""
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return None
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def run_host(detector: Path, first: Path, second: Path, cache: Path) -> None:
    gc.collect()
    mx.clear_cache()
    STEPS["rss before load"] = {"bytes": rss()}
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
        note = f"MLX active -{freed / MiB:.1f} MiB"
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
        await host.unload("reasoner")
        await host.unload("detector")
        gc.collect()
        mx.clear_cache()
        STEPS["rss after unload"] = {"bytes": rss(), "loaded": rss_loaded}
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


def _rows(scale: int) -> list[Row]:
    base = STEPS["baseline: mlx_vlm.load + float32 cast"]
    cpu = mlx_runtime.on_cpu()
    dtype = "CPU keeps float32, 2x the bfloat16 files; " if cpu else ""
    rows = []
    for role in ("detector", "reasoner"):
        step = STEPS[f"host: load {role}"]
        rows.append(compare(f"{role} x{scale}: resident after load vs weights on disk",
                            step["resident"] / MiB, step["weights"] / MiB, unit="MiB",
                            at_most=1.15, note=f"{dtype}{step['note']}"))  # fmt: skip
        rows.append(compare(f"{role} x{scale}: peak during load vs resident after",
                            step["peak"] / MiB, step["resident"] / MiB, unit="MiB", at_most=1.2,
                            note="MLX's peak above the step's start"))  # fmt: skip
    step = STEPS["host: load reasoner"]
    rows.append(compare(f"reasoner x{scale}: load time vs mlx_vlm.load + float32 cast",
                        step["seconds"], base["seconds"], unit="s", at_most=1.1,
                        note="one sample each; target proposed here"))  # fmt: skip
    step = STEPS["host: swap reasoner A->B, beside"]
    rows.append(compare(f"reasoner x{scale}: swap A->B beside, time vs plain load",
                        step["seconds"], base["seconds"], unit="s", at_most=1.2,
                        note=f"{step['note']}; target proposed here"))  # fmt: skip
    step = STEPS["host: swap reasoner A->B, freed first"]
    rows.append(compare(f"reasoner x{scale}: swap A->B freed first, peak vs resident",
                        step["peak"] / MiB, step["resident"] / MiB, unit="MiB", at_most=1.2,
                        note=step["note"]))  # fmt: skip
    step = STEPS["host: quantize 4 bits, load cached copy"]
    alone = STEPS["mlx-vlm convert to 4 bits (alone)"]
    convert = STEPS["host: quantize 4 bits, convert + load"]
    rows.append(compare(f"reasoner x{scale}: quantize 4 bits + load vs mlx-vlm convert alone",
                        convert["seconds"], alone["seconds"], unit="s", at_most=1.5,
                        note=f"{convert['note']}; target proposed here"))  # fmt: skip
    rows.append(compare(f"reasoner x{scale}: load cached 4-bit copy vs plain load (bf16)",
                        step["seconds"], base["seconds"], unit="s", at_most=1.0,
                        note="target proposed here"))  # fmt: skip
    before, after = STEPS["rss before load"]["bytes"], STEPS["rss after unload"]
    if before and after["bytes"]:
        rows.append(compare("process RSS after unloading both vs before loading",
                            after["bytes"] / MiB, before / MiB, unit="MiB", at_most=1.05,
                            note=f"{after['loaded'] / MiB:.0f} MiB with both loaded"))  # fmt: skip
    return rows


def run(quick: bool) -> list[Row]:
    """Checkpoints `scale` times wider than the tiny test ones (8 quick, 16 full)."""
    scale = 8 if quick else 16
    logging.basicConfig(level=logging.WARNING)
    STEPS.clear()
    root = Path(tempfile.mkdtemp(prefix="aip-model-bench-"))
    detector = tiny.build_detector(root / f"falcon-x{scale}", scale=scale)
    first = tiny.build_reasoner(root / f"gemma-x{scale}-a", scale=scale)
    second = tiny.build_reasoner(root / f"gemma-x{scale}-b", scale=scale, seed=1)
    cache = Path(tempfile.mkdtemp(prefix="aip-model-bench-q-"))
    try:
        baseline(first)
        asyncio.run(run_host(detector, first, second, cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return _rows(scale)


if __name__ == "__main__":
    main_for("model_host", run, __doc__)
